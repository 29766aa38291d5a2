"""The digits classifier (examples/digits) as a single-file model: `truss init --python-config`'s
shape, `truss push digits_model.py`'s deployment - one truss, generated from this file.

    tr = truss_lab.load("examples/digits-model/digits_model.py")
    tr.predict({"image_b64": base64.b64encode(png_bytes).decode(), "top_k": 3})
"""

import base64
import io

import numpy as np
import truss_chains as chains

DATA = chains.make_abs_path_here("../digits/data")  # the digits truss's trained model and labels


class Model(chains.ModelBase):
    remote_config = chains.RemoteConfig(
        name="digits-model",
        docker_image=chains.DockerImage(pip_requirements=["tensorflow>=2.16", "pillow", "numpy"], data_dir=DATA),
        compute=chains.Compute(predict_concurrency=1),  # the GPU lock
    )

    def __init__(self, context: chains.DeploymentContext = chains.depends_context()) -> None:
        import tensorflow as tf

        self._model = tf.keras.models.load_model(context.data_dir / "digits.keras", compile=False)
        self._labels = (context.data_dir / "labels.txt").read_text().split()

    def predict(self, image_b64: str, top_k: int = 3) -> dict[str, float]:
        import tensorflow as tf
        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("L")
        gray = np.asarray(image, dtype=np.float32) / 255.0
        if gray.mean() > 0.5:  # dark ink on light paper: the model wants ink high
            gray = 1.0 - gray
        small = Image.fromarray(np.round(gray * 255).astype(np.uint8)).resize((8, 8), Image.BOX)
        x = (np.asarray(small, dtype=np.float32) / 255.0).reshape(1, 8, 8, 1)
        probabilities = tf.nn.softmax(self._model(x, training=False)).numpy()[0].astype(float)
        best = sorted(range(len(self._labels)), key=lambda i: (-probabilities[i], i))[:top_k]
        return {self._labels[i]: round(100 * probabilities[i], 2) for i in best}
