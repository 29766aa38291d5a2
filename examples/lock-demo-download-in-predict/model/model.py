"""The same model as ../lock-demo, but predict downloads the image itself: the lock waits on the network.

Input: {"url": "http://127.0.0.1:<port>/<image>"}.
"""

import urllib.request

import tensorflow as tf


class Model:
    def load(self):
        tf.keras.utils.set_random_seed(0)
        self._net = tf.keras.Sequential(
            [
                tf.keras.Input((96, 96, 3)),
                tf.keras.layers.Conv2D(32, 3, activation="relu"),
                tf.keras.layers.Conv2D(32, 3, activation="relu"),
                tf.keras.layers.GlobalAveragePooling2D(),
                tf.keras.layers.Dense(4),
            ]
        )

    def predict(self, request):
        with urllib.request.urlopen(request["url"], timeout=30) as response:  # WRONG: I/O under the lock
            data = response.read()
        image = tf.image.decode_image(data, channels=3, expand_animations=False)
        images = tf.image.resize(image, (96, 96))[None] / 255.0
        return self._net(images, training=False).numpy()

    def postprocess(self, scores):
        return {"scores": [round(float(s), 3) for s in scores[0]]}
