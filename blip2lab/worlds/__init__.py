"""The two worlds blip2lab trains BLIP-2 in on a laptop: `shapes` (synthetic scenes, every
backbone pretrained here) and `minireal` (real pretrained backbones from PyPI packages,
bridged by a Q-Former trained here on cliparts). Research code: the general package never
imports it."""
