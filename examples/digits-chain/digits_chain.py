"""The digits classifier (examples/digits) as a Truss Chain: the seed's advice - GPU work apart from
CPU work - made into separate deployments.

    Preprocess  (CPU): decode the PNG, grayscale, ink-high, 8x8 in [0, 1]      predict_concurrency 4
    Classify    (GPU): the Keras model only                                   predict_concurrency 1
    Digits      (entrypoint): calls both, returns the top-k labels in percent   predict_concurrency 8

    chain = truss_lab.load_chain("examples/digits-chain/digits_chain.py")
    chain.run(image_b64=base64.b64encode(png_bytes).decode(), top_k=3)
"""

import base64
import io

import numpy as np
import pydantic
import truss_chains as chains

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DATA = chains.make_abs_path_here("../digits/data")  # the digits truss's trained model (copied into Classify's data/)


class Pixels(pydantic.BaseModel):
    """An 8x8 image, row by row, ink-high in [0, 1]: what crosses the wire between the chainlets."""

    values: list[float]


class Preprocess(chains.ChainletBase):
    remote_config = chains.RemoteConfig(
        docker_image=chains.DockerImage(pip_requirements=["pillow", "numpy"]),
        compute=chains.Compute(cpu_count=1, predict_concurrency=4),
    )

    def run_remote(self, image_b64: str) -> Pixels:
        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("L")
        gray = np.asarray(image, dtype=np.float32) / 255.0
        if gray.mean() > 0.5:  # dark ink on light paper: the model wants ink high
            gray = 1.0 - gray
        small = Image.fromarray(np.round(gray * 255).astype(np.uint8)).resize((8, 8), Image.BOX)
        return Pixels(values=(np.asarray(small, dtype=np.float32) / 255.0).ravel().tolist())


class Classify(chains.ChainletBase):
    remote_config = chains.RemoteConfig(
        docker_image=chains.DockerImage(pip_requirements=["tensorflow>=2.16"], data_dir=DATA),
        compute=chains.Compute(predict_concurrency=1),  # the GPU lock
    )

    def __init__(self, context: chains.DeploymentContext = chains.depends_context()):
        import tensorflow as tf

        self._model = tf.keras.models.load_model(context.data_dir / "digits.keras", compile=False)

    def run_remote(self, pixels: Pixels) -> list[float]:
        import tensorflow as tf

        x = np.asarray(pixels.values, dtype=np.float32).reshape(1, 8, 8, 1)
        logits = self._model(x, training=False)
        return tf.nn.softmax(logits).numpy()[0].astype(float).tolist()


@chains.mark_entrypoint
class Digits(chains.ChainletBase):
    remote_config = chains.RemoteConfig(  # it mostly waits on the others: take many requests at once
        compute=chains.Compute(cpu_count=1, predict_concurrency=8),
    )

    def __init__(self, preprocess: Preprocess = chains.depends(Preprocess),
                 classify: Classify = chains.depends(Classify)):
        self._preprocess, self._classify = preprocess, classify

    def run_remote(self, image_b64: str, top_k: int = 3) -> dict[str, float]:
        probabilities = self._classify.run_remote(self._preprocess.run_remote(image_b64))
        best = sorted(range(len(LABELS)), key=lambda i: (-probabilities[i], i))[:top_k]
        return {LABELS[i]: round(100 * probabilities[i], 2) for i in best}
