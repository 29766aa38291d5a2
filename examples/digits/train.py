"""Train the digits truss's model: a small Keras CNN on scikit-learn's handwritten digits (offline).

    python examples/digits/train.py            # writes data/digits.keras, data/labels.txt, data/samples/*.png

`sklearn.datasets.load_digits` ships 1,797 8x8 images (ink 0..16) with the library, so nothing is
downloaded. The split and the training are seeded, so the same machine trains the same model; the
held-out accuracy is printed (expected >= 95 %). The sample PNGs are held-out images drawn as dark
ink on white paper and upscaled to 96x96, as a photo of a handwritten digit would be: preprocess has
to undo exactly that (grayscale, invert, downscale to 8x8, scale to [0, 1]).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SEED = 0


def build_model():
    from tensorflow import keras
    from tensorflow.keras import layers

    inputs = keras.Input((8, 8, 1), name="digit")
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(64, activation="relu")(x)
    outputs = layers.Dense(10, name="logits")(x)  # logits: postprocess applies the softmax
    return keras.Model(inputs, outputs, name="digits_cnn")


def split():
    """(x_train, x_test, y_train, y_test): images scaled to [0, 1], shape (n, 8, 8, 1)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    return train_test_split(x, digits.target, test_size=0.2, random_state=SEED, stratify=digits.target)


def sample_png(image, size: int = 96) -> bytes:
    """An 8x8 [0, 1] ink image as a PNG of dark ink on white, upscaled (bicubic) to size x size."""
    import io

    import numpy as np
    from PIL import Image

    paper = (255 - np.clip(image[..., 0], 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(paper, mode="L").resize((size, size), Image.BICUBIC).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "data", help="where to write the model, labels and samples")
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args(argv)

    import tensorflow as tf

    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    x_train, x_test, y_train, y_test = split()
    model = build_model()
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=32, shuffle=True, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    args.out.mkdir(parents=True, exist_ok=True)
    inference = build_model()  # the same network without the optimizer's state: a third of the file
    inference.set_weights(model.get_weights())
    inference.save(args.out / "digits.keras")
    (args.out / "labels.txt").write_text("\n".join(LABELS) + "\n")
    samples = args.out / "samples"
    samples.mkdir(exist_ok=True)
    for digit in (0, 2, 3, 5, 7, 8):  # the first held-out image of each
        index = int((y_test == digit).nonzero()[0][0])
        (samples / f"{LABELS[digit]}.png").write_bytes(sample_png(x_test[index]))
    print(f"held-out accuracy: {accuracy:.4f} on {len(y_test)} images (train {len(y_train)}); wrote {args.out}")
    return accuracy


if __name__ == "__main__":
    main()
