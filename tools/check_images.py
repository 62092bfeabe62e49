"""Lists every image file under a folder that the input pipeline cannot decode.

    python -m tools.check_images /path/to/image_folder [--channels 3]

Training stops at the first undecodable image of an image folder and names
it; run this before a long run to find all of them at once. Uses the
pipeline's own decoder (TensorFlow's decode_image), over every file with an
image suffix. Prints one path per bad file and a count; exits 1 if any.
"""

import argparse
import os
import pathlib
import sys

SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp"}


def undecodable(root: pathlib.Path, channels: int = 3):
    """Yields (path, reason) for each image file under root that does not decode."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()):
        try:
            tf.io.decode_image(path.read_bytes(), channels=channels, expand_animations=False)
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            yield path, str(getattr(e, "message", e)).splitlines()[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=pathlib.Path)
    parser.add_argument("--channels", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder.", file=sys.stderr)
        return 2
    count = 0
    for path, reason in undecodable(args.folder, args.channels):
        print(f"{path}: {reason}")
        count += 1
    print(f"{count} undecodable image file(s) under {args.folder}.")
    return 1 if count else 0


if __name__ == "__main__":
    sys.exit(main())
