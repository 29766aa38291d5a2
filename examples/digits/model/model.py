"""Handwritten digits with TensorFlow, in the shape of Truss's ResNet example.

preprocess  : fetch + decode the image (path, bytes, data: URI or http(s) URL), grayscale, ink-high,
              8x8, [0, 1] - the way the model was trained (see ../train.py). No GPU needed.
predict     : the Keras model only (holds the GPU lock).
postprocess : softmax + the top-k labels with percentages, names from data/labels.txt.
"""

import base64
import urllib.request
from pathlib import Path

import numpy as np
import tensorflow as tf

IMAGE_SIZE = 8  # what the network takes: sklearn's 8x8 digits


class Model:
    def __init__(self, data_dir: Path, **kwargs):
        self._data_dir = Path(data_dir)
        self._model = None
        self._labels: list[str] = []

    def load(self):
        self._model = tf.keras.models.load_model(self._data_dir / "digits.keras", compile=False)
        self._labels = (self._data_dir / "labels.txt").read_text().split()

    def preprocess(self, request):
        """{"image": ref, "top_k": 5} or a bare ref -> {"x": (1, 8, 8, 1) float32 in [0, 1], "top_k": k}."""
        if isinstance(request, dict):
            if "image" not in request and "url" not in request:
                raise ValueError('expected {"image": <path | bytes | data: URI | URL>, "top_k": 5}')
            ref, top_k = request.get("image", request.get("url")), int(request.get("top_k", 5))
        else:
            ref, top_k = request, 5
        image = tf.image.decode_image(self._read(ref), channels=3, expand_animations=False)
        gray = tf.image.convert_image_dtype(tf.image.rgb_to_grayscale(image), tf.float32)  # [0, 1]
        if float(tf.reduce_mean(gray)) > 0.5:  # dark ink on light paper: the model wants ink high
            gray = 1.0 - gray
        small = tf.image.resize(gray, (IMAGE_SIZE, IMAGE_SIZE), method="area")
        return {"x": small.numpy()[None], "top_k": max(1, min(top_k, len(self._labels)))}

    def predict(self, model_input):
        logits = self._model(model_input["x"], training=False)
        return {"logits": logits.numpy()[0], "top_k": model_input["top_k"]}

    def postprocess(self, model_output):
        """Top-k labels with their softmax probability in percent, best first."""
        percent = np.round(tf.nn.softmax(model_output["logits"]).numpy().astype(np.float64) * 100, 2)
        best = sorted(range(len(percent)), key=lambda i: (-percent[i], i))[: model_output["top_k"]]  # ties: label order
        return {"predictions": {self._labels[i]: float(percent[i]) for i in best}}

    def _read(self, ref) -> bytes:
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return bytes(ref)
        if not isinstance(ref, str):
            raise TypeError(f"image must be a path, bytes, a data: URI or a URL, not {type(ref).__name__}")
        if ref.startswith("data:"):
            return base64.b64decode(ref.split(",", 1)[1])
        if ref.startswith(("http://", "https://")):
            with urllib.request.urlopen(ref, timeout=30) as response:
                return response.read()
        path = Path(ref).expanduser()
        if not path.is_absolute() and not path.exists():
            path = self._data_dir / ref  # examples.yaml paths are relative to data/
        return path.read_bytes()
