"""ResNet50V2 on ImageNet, as in Truss's TensorFlow example - with the labels shipped in data/.

preprocess  : fetch the image (URL, path, bytes or data: URI), decode, resize to 224x224,
              resnet_v2.preprocess_input (scales to [-1, 1]). Network and CPU work: no lock.
predict     : the network only (the GPU lock).
postprocess : softmax, the top-5 ImageNet labels with percentages.
"""

import base64
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

WEIGHTS_FILE = "resnet50v2_weights_tf_dim_ordering_tf_kernels.h5"  # the name Keras downloads


class Model:
    def __init__(self, data_dir: Path, config: dict, **kwargs):
        self._data_dir = Path(data_dir)
        self._weights = str((config.get("model_metadata") or {}).get("weights", "auto")).lower()
        self._model = None
        self._labels: list[str] = []
        self.weights_source = ""

    def load(self):
        local = self._data_dir / WEIGHTS_FILE
        if self._weights == "auto":
            weights = str(local) if local.exists() else None
        elif self._weights == "imagenet":
            weights = "imagenet"
        elif self._weights == "none":
            weights = None
        else:
            raise ValueError(f"model_metadata.weights: expected auto, imagenet or none, got {self._weights!r}")
        self.weights_source = {None: "untrained (weights=None)", "imagenet": "ImageNet (Keras download)"}.get(
            weights, f"ImageNet ({WEIGHTS_FILE} from data/)"
        )
        if weights is None and self._weights == "auto":
            warnings.warn(
                f"ResNet50V2: no {WEIGHTS_FILE} in {self._data_dir}; using UNTRAINED weights - "
                "the labels it predicts mean nothing (set model_metadata.weights: imagenet to download)",
                stacklevel=1,
            )
        if weights is None:
            tf.keras.utils.set_random_seed(0)  # untrained, but the same untrained network on every load
        # logits out (no softmax in the network): postprocess applies the one softmax
        self._model = tf.keras.applications.ResNet50V2(weights=weights, classifier_activation=None)
        self._labels = (self._data_dir / "imagenet_labels.txt").read_text().splitlines()

    def preprocess(self, request):
        ref = request.get("url", request.get("image")) if isinstance(request, dict) else request
        if ref is None:
            raise ValueError('expected {"url": <URL | path | data: URI>} (or the image bytes)')
        image = tf.image.decode_image(self._read(ref), channels=3, expand_animations=False)
        image = tf.image.resize(image, (224, 224))
        image = tf.keras.applications.resnet_v2.preprocess_input(image)
        return tf.expand_dims(image, 0).numpy()

    def predict(self, model_input):
        return {"predictions": self._model(model_input, training=False).numpy()}

    def postprocess(self, model_output):
        percent = np.round(tf.nn.softmax(model_output["predictions"][0]).numpy().astype(np.float64) * 100, 2)
        top5 = sorted(range(len(percent)), key=lambda i: (-percent[i], i))[:5]
        return {"predictions": {self._labels[i]: float(percent[i]) for i in top5}}

    def _read(self, ref) -> bytes:
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return bytes(ref)
        if ref.startswith("data:"):
            return base64.b64decode(ref.split(",", 1)[1])
        if ref.startswith(("http://", "https://")):
            with urllib.request.urlopen(ref, timeout=30) as response:
                return response.read()
        path = Path(ref).expanduser()
        return (path if path.is_absolute() or path.exists() else self._data_dir / ref).read_bytes()
