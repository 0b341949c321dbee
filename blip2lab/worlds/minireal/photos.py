"""Real photos that ship inside installed packages (scikit-image, scikit-learn, matplotlib):
the offline test images of mini-real, each with the words that name its main object.

Only files bundled in the wheels are used (skimage's `data_dir` files, not its pooch
downloads), so nothing is fetched. `main_object` lists acceptable names of what a person
would call the photo's subject, for counting how many captions name it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["Photo", "PHOTOS", "load_photo", "load_photos"]


@dataclass(frozen=True)
class Photo:
    package: str  # the installed package that ships the file
    file: str  # path inside that package
    main_object: tuple[str, ...]  # words naming the subject (lower case)
    credit: str  # where the picture comes from, as its package documents it


PHOTOS: dict[str, Photo] = {
    "chelsea": Photo("skimage", "data/chelsea.png", ("cat", "kitten", "tabby"), "skimage: Chelsea the cat, CC0 (Stefan van der Walt)"),
    "coffee": Photo("skimage", "data/coffee.png", ("coffee", "cup", "espresso", "mug"), "skimage: a coffee cup, CC0 (Rachel Michetti)"),
    "astronaut": Photo("skimage", "data/astronaut.png", ("astronaut", "woman", "person", "eileen collins"),
                       "skimage: astronaut Eileen Collins, NASA, public domain"),
    "rocket": Photo("skimage", "data/rocket.jpg", ("rocket", "launch", "shuttle", "falcon"),
                    "skimage: a SpaceX launch, public domain"),
    "motorcycle": Photo("skimage", "data/motorcycle_left.png", ("motorcycle", "motorbike", "bike"),
                        "skimage: the left view of a motorcycle stereo pair"),
    "camera": Photo("skimage", "data/camera.png", ("man", "camera", "photographer", "person", "cameraman"),
                    "skimage: a man with a camera on a tripod, grey, CC0 (Lav Varshney)"),
    "china": Photo("sklearn", "datasets/images/china.jpg", ("temple", "palace", "building", "pagoda", "roof"),
                   "sklearn: a Chinese temple roof, CC BY 2.0 (danielbuechele)"),
    "flower": Photo("sklearn", "datasets/images/flower.jpg", ("flower", "daisy", "petal"),
                    "sklearn: a flower, CC BY 2.0 (vultilion)"),
    "grace_hopper": Photo("matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
                          ("woman", "person", "officer", "uniform", "grace hopper", "lady"),
                          "matplotlib: Grace Hopper in uniform, US Navy, public domain"),
}


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {name!r} that ships this photo is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def load_photo(name: str) -> Image.Image:
    """One bundled photo as an RGB PIL image (grey ones expanded to three channels)."""
    if name not in PHOTOS:
        raise KeyError(f"unknown photo {name!r}; known: {sorted(PHOTOS)}")
    photo = PHOTOS[name]
    with Image.open(_package_dir(photo.package) / photo.file) as img:
        return img.convert("RGB")


def load_photos() -> dict[str, Image.Image]:
    """Every bundled photo, by name."""
    return {name: load_photo(name) for name in PHOTOS}
