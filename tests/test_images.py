"""fastdiff.images.save_images: one PNG per sample, read back pixel for pixel."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.images import save_images, to_uint8


def expected_uint8(x):
    """The grids' conversion, written out: [-1, 1] -> round((x + 1) * 127.5), clamped, HWC."""
    return np.round((np.clip(x.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_save_images_pixels_and_names(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, channels, 6, 7, generator=g) * 2.4 - 1.2  # some values outside [-1, 1]
    x[0, 0, 0, :3] = torch.tensor([-1.0, 0.0, 1.0])
    seeds = torch.arange(120, 125)
    labels = torch.tensor([7, 0, 3, 3, 9])
    paths = save_images(x, seeds, labels, tmp_path / "out")
    assert [p.name for p in paths] == ["seed000120-label7.png", "seed000121-label0.png", "seed000122-label3.png",
                                       "seed000123-label3.png", "seed000124-label9.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in paths]  # no temporaries left
    want = expected_uint8(x)
    np.testing.assert_array_equal(want, to_uint8(x))
    for p, w in zip(paths, want):
        img = Image.open(p)
        assert img.format == "PNG" and img.size == (7, 6) and img.mode == ("L" if channels == 1 else "RGB")
        got = np.asarray(img)
        np.testing.assert_array_equal(got.reshape(w.shape), w)
    assert np.asarray(Image.open(paths[0])).reshape(6, 7, channels)[0, :3, 0].tolist() == [0, 128, 255]


def test_save_images_unconditional_and_mismatch(tmp_path):
    x = torch.zeros(2, 1, 4, 4)
    paths = save_images(x, [3, 1234567], None, tmp_path)
    assert [p.name for p in paths] == ["seed000003.png", "seed1234567.png"]
    assert (np.asarray(Image.open(paths[1])) == 128).all()
    with pytest.raises(ValueError, match="2 images, 3 seeds"):
        save_images(x, [1, 2, 3], None, tmp_path)


def test_check_images_folder(tmp_path):
    from fastdiff.errors import FastdiffError
    from fastdiff.images import check_images_folder

    source = {"checkpoint": "run", "weights": "abc", "steps": 4}
    check_images_folder(tmp_path / "new", [1, 2], None, source)  # a folder yet to be made holds nothing
    save_images(torch.zeros(2, 1, 4, 4), [1, 2], [0, 1], tmp_path)  # no source: no manifest
    (tmp_path / "seed-notes.png").write_bytes(b"")  # not a sample name: the user's, ignored
    check_images_folder(tmp_path, [1, 2], [0, 1], source)  # the same names are replaced
    check_images_folder(tmp_path, [1, 2, 3], [0, 1, 2], source)
    with pytest.raises(FastdiffError, match=r"holds 1 sample image\(s\) of an unknown sampling.*seed000002-label1"):
        check_images_folder(tmp_path, [1], [0], source)
    with pytest.raises(FastdiffError, match="holds 2 sample image"):
        check_images_folder(tmp_path, [1, 2], None, source)  # unconditional names differ from labelled ones
    save_images(torch.zeros(1, 1, 4, 4), [9], None, tmp_path / "m", source)
    check_images_folder(tmp_path / "m", [3], None, source)  # the same sampling's other seeds: a shard
    check_images_folder(tmp_path / "m", [3], None, {**source, "checkpoint": "elsewhere"})  # where it was read from
    with pytest.raises(FastdiffError, match=r"another sampling \(weights 'abc' there, 'def' now; the weights of run "
                                            r"there, of other now\)"):
        check_images_folder(tmp_path / "m", [3], None, {**source, "weights": "def", "checkpoint": "other"})


def test_class_columns_keep_a_class_per_column_near_a_square_grid():
    # Cycling labels (i % classes) in rows of a multiple of the classes: each column one class. A 2-class model's
    # 64 samples were a strip 2 wide and 32 tall; 100 samples of 100 classes a row 100 wide.
    from fastdiff.images import class_columns

    assert class_columns(64, 2) == 8 and class_columns(40, 2) == 6 and class_columns(40, 1) == 6
    assert class_columns(40, 10) == 10 and class_columns(100, 10) == 10 and class_columns(35, 7) == 7
    assert class_columns(1000, 10) == 30 and class_columns(99, 10) == 10  # a last row part full
    assert class_columns(100, 100) is None and class_columns(15, 10) is None and class_columns(64, 0) is None


def test_the_trajectory_figure_leaves_the_callers_matplotlib_backend(tmp_path):
    # save_trajectory called matplotlib.use("Agg"), switching a notebook's inline backend for the whole process.
    import matplotlib

    from fastdiff.images import save_trajectory

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        frames = [(f"t={t}", torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1) for t in (999, 500, 0)]
        path = save_trajectory(frames, tmp_path / "t.png", title="trajectory")
        assert matplotlib.get_backend() == "pdf" and path.read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)
