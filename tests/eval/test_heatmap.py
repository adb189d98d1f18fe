"""Grad-CAM heat maps drawn over their image: the map's peak lands where it was put, the
boxes are drawn in their colours, at least MIN_SIDE pixels on the short side."""
import torch
from PIL import Image

from albef_ds.eval.heatmap import MIN_SIDE, heat_overlay, save_heatmap


def test_the_overlay_is_hottest_where_the_map_is(tmp_path):
    image = Image.new("RGB", (64, 64), (0, 0, 128))
    cam = torch.zeros(4, 4)
    cam[3, 0] = 1.0  # bottom-left patch
    out = heat_overlay(image, cam)
    red = torch.tensor(list(out.getdata()), dtype=torch.float32)[:, 0].reshape(64, 64)
    y, x = divmod(int(red.argmax()), 64)
    assert y >= 48 and x < 16, (y, x)
    assert float(red[:16, 48:].max()) < 10  # the top-right stays the image's own colour


def test_save_heatmap_writes_boxes_over_the_scaled_image(tmp_path):
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "img.png")
    save_heatmap(tmp_path / "out.png", tmp_path / "img.png", torch.rand(4, 4), "the red circle",
                 truth=[4, 4, 20, 20], chosen=[36, 36, 20, 20])
    out = Image.open(tmp_path / "out.png").convert("RGB")
    scale = MIN_SIDE / 64
    assert out.size == (MIN_SIDE, MIN_SIDE + 20)
    assert out.getpixel((int(4 * scale), int(12 * scale))) == (0, 200, 0)  # the truth's left edge
    assert out.getpixel((int(36 * scale), int(44 * scale))) == (230, 0, 0)  # the chosen box's left edge
