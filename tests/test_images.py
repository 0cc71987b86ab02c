import numpy as np
import pytest
from PIL import Image

from machinery import images


def test_an_image_reads_when_the_user_turned_pillows_pixel_limit_off(tmp_path, monkeypatch):
    Image.fromarray(np.full((8, 12, 3), 7, dtype=np.uint8)).save(tmp_path / "photo.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)                   # Pillow's guard switched off
    x = images.read_pixels(str(tmp_path / "photo.png"))
    assert x.shape == (1, 3, 8, 12) and int(x.max()) == 7
    with pytest.raises(ValueError, match="more than the limit"):            # an explicit limit still holds
        images.read_pixels(str(tmp_path / "photo.png"), max_pixels=50)
