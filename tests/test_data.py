"""Every dataset format from tiny files made here, the download path against a local HTTP server, and the
errors for missing or corrupt files."""

import gzip
import hashlib
import http.server
import json
import os
import pickle
import shutil
import tarfile
import threading
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff.data import download as dl
from fastdiff.data import formats, load_dataset
from fastdiff.errors import ConfigError, DataError

# The files written here are not the published archives; the warning about that has its own test.
pytestmark = pytest.mark.filterwarnings("ignore::fastdiff.data.download.DataWarning")


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train=12, n_test=5, gz=True, size=28):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte"] = idx_bytes(rng.integers(0, 256, (n, size, size)))
        files[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(np.arange(n) % 10)
    written = {}
    for name, data in files.items():
        path = folder / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        written[path.name] = path
    return written


def test_digits_default():
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    x, y = train.batch(torch.arange(4), "cpu")
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.int64
    assert train.num_classes == 10
    assert load_dataset("digits", image_size=16).images.shape[-1] == 16


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    write_mnist(tmp_path / "mnist", gz=gz)
    d = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert d.images.shape == (12, 1, 28, 28) and d.labels.tolist()[:3] == [0, 1, 2]
    t = load_dataset("mnist", "test", data_dir=tmp_path, image_size=32)
    assert t.images.shape == (5, 1, 32, 32)


def test_idx_header_whose_size_overflows_int64(tmp_path):
    # dims 2^31 x 2^31 x 4: numpy's int64 product wraps to 0, so a bare header passed the length check
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big"))
    with pytest.raises(DataError, match=r"has 16 bytes but its header \(2147483648, 2147483648, 4\) needs"):
        formats.read_idx(path, 3)


@pytest.mark.parametrize("damage", ["magic", "truncated", "gzip"])
def test_corrupt_idx(tmp_path, damage):
    files = write_mnist(tmp_path / "fashion-mnist")
    path = files["train-images-idx3-ubyte.gz"]
    raw = gzip.decompress(path.read_bytes())
    if damage == "magic":
        path.write_bytes(gzip.compress(b"\x00\x00\x09\x03" + raw[4:]))
    elif damage == "truncated":
        path.write_bytes(gzip.compress(raw[:-7]))
    else:
        path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz") as e:
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    assert "download it again" in str(e.value)


def write_cifar(folder: Path, protocol=2):
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3],
             b"batch_label": b"x", b"filenames": [b"a", b"b", b"c"]}
        (batches / name).write_bytes(pickle.dumps(d, protocol=protocol))
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 5: numpy pickles arrays through _frombuffer
def test_cifar10(tmp_path, protocol):
    write_cifar(tmp_path / "cifar10", protocol)
    d = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert d.images.shape == (15, 3, 32, 32) and d.num_classes == 10
    assert load_dataset("cifar10", "test", data_dir=tmp_path).images.shape == (3, 3, 32, 32)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    batches = write_cifar(tmp_path / "cifar10")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (batches / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="not allowed"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


def write_cifar_archive(tmp_path):
    """data/cifar10/cifar-10-python.tar.gz holding the small batches of write_cifar."""
    src = tmp_path / "src"
    write_cifar(src)
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_cifar_from_archive(tmp_path):
    write_cifar_archive(tmp_path)
    assert len(load_dataset("cifar10", data_dir=tmp_path, download=False)) == 15


def test_one_process_at_a_time_downloads_and_unpacks_a_datasets_files(tmp_path, http_server, monkeypatch,
                                                                      lock_is_held):
    """torchrun's ranks each downloaded into one shared FILE.part and unpacked one archive into one folder at once:
    a rank read a batch another was still writing ("pickle data was truncated; delete it and download again"). The
    download and the unpacking now run under a lock that every other process waits for, and each download writes
    a temporary file of its own."""
    from fastdiff.data import formats

    seen = []
    real_extract, real_fetch = formats.extract_tar, dl.download_file
    monkeypatch.setattr(formats, "extract_tar", lambda a, d: (seen.append(lock_is_held("data", d)), real_extract(a, d)))
    write_cifar_archive(tmp_path)
    assert len(load_dataset("cifar10", data_dir=tmp_path, download=False)) == 15 and seen == [True]
    assert not lock_is_held("data", tmp_path / "cifar10")  # and released

    def fetch(filename, mirrors, checksum, dest_dir, timeout=60):
        seen.append(lock_is_held("data", dest_dir))
        return real_fetch(filename, mirrors, checksum, dest_dir, timeout)

    root, url = http_server
    _serve_mnist(root, monkeypatch, url)
    monkeypatch.setattr(dl, "download_file", fetch)
    parts = []
    copy = shutil.copyfileobj
    monkeypatch.setattr(dl.shutil, "copyfileobj", lambda src, out, *n: (  # the test's server copies with it too
        parts.append(Path(getattr(out, "name", "")).name), copy(src, out, *n)))
    assert load_dataset("mnist", data_dir=tmp_path / "data").images.shape == (12, 1, 28, 28)
    assert len(seen) == 5 and all(seen)
    parts = [p for p in parts if p.endswith(".tmp")]
    assert len(parts) == 4 and all(p.endswith(f".{os.getpid()}.tmp") for p in parts), parts


def test_fer2013(tmp_path):
    rows = ["emotion,pixels,Usage"]
    for i, usage in enumerate(["Training", "Training", "PublicTest", "PrivateTest"]):
        rows.append(f"{i % 7}," + " ".join(str((i + j) % 256) for j in range(48 * 48)) + f",{usage}")
    (tmp_path / "fer2013").mkdir()
    (tmp_path / "fer2013" / "fer2013.csv").write_text("\n".join(rows) + "\n")
    train = load_dataset("fer2013", data_dir=tmp_path)
    assert train.images.shape == (2, 1, 48, 48) and train.num_classes == 7
    assert len(load_dataset("fer2013", "test", data_dir=tmp_path)) == 2
    # a CSV saved with a byte-order mark (as spreadsheet programs write UTF-8) reads the same
    (tmp_path / "fer2013" / "fer2013.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    assert torch.equal(load_dataset("fer2013", data_dir=tmp_path).images, train.images)
    rows[2] = "1,1 2 3,Training"
    (tmp_path / "fer2013" / "fer2013.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="line 3 has 3 pixel values"):
        load_dataset("fer2013", data_dir=tmp_path)


def test_fer2013_missing_explains(tmp_path):
    with pytest.raises(DataError, match="Kaggle"):
        load_dataset("fer2013", data_dir=tmp_path)


def test_folder(tmp_path):
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(np.full((20, 30, 3), i * 20, np.uint8)).save(tmp_path / cls / f"{i}.png")
    train = load_dataset("folder", data_dir=tmp_path, image_size=16, channels=3)
    test = load_dataset("folder", "test", data_dir=tmp_path, image_size=16, channels=3)
    assert train.images.shape == (18, 3, 16, 16) and test.images.shape == (2, 3, 16, 16)
    assert train.class_names == ["cats", "dogs"]
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset("folder", data_dir=tmp_path, image_size=16, channels=3)


def test_synthetic_and_errors(tmp_path):
    d = load_dataset("synthetic", image_size=8, channels=3)
    assert d.images.shape == (1024, 3, 8, 8)
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="1 channel"):
        load_dataset("digits", channels=3)
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _serve_mnist(root: Path, monkeypatch, url, algorithm="md5"):
    files = write_mnist(root)
    checksums = {name: f"{algorithm}:{hashlib.new(algorithm, p.read_bytes()).hexdigest()}" for name, p in files.items()}
    monkeypatch.setitem(dl.RESOURCES, "mnist", {"mirrors": ["http://127.0.0.1:9/nothing/", url], "files": checksums})
    return checksums


def test_download_from_local_server(tmp_path, http_server, monkeypatch):
    root, url = http_server
    _serve_mnist(root, monkeypatch, url, "sha256")
    d = load_dataset("mnist", data_dir=tmp_path / "data")
    assert d.images.shape == (12, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir() if p.name.startswith("train"))[0].endswith(
        ".gz")
    assert not list((tmp_path / "data" / "mnist").glob(".*.tmp"))


def test_download_checksum_mismatch(tmp_path, http_server, monkeypatch):
    root, url = http_server
    checksums = _serve_mnist(root, monkeypatch, url)
    checksums["train-images-idx3-ubyte.gz"] = "md5:" + "0" * 32
    with pytest.raises(DataError, match="failed its md5 check") as e:
        load_dataset("mnist", data_dir=tmp_path / "data")
    assert "put them in" in str(e.value)
    assert not (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_download_cut_off_mid_chunk_tries_the_next_mirror(tmp_path, monkeypatch):
    # http.client.IncompleteRead (a chunked transfer dropped) is no OSError: it escaped as a traceback
    import http.client
    import io

    class Dropped(io.BytesIO):
        def read(self, *args):
            raise http.client.IncompleteRead(b"")

    monkeypatch.setattr(dl.urllib.request, "urlopen", lambda url, timeout: Dropped())
    with pytest.raises(DataError, match="could not download x.bin .*IncompleteRead"):
        dl.download_file("x.bin", ["http://a/", "http://b/"], "md5:" + "0" * 32, tmp_path)
    assert not list(tmp_path.iterdir())


def test_download_offline_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setitem(dl.RESOURCES, "cifar10", {"mirrors": ["http://127.0.0.1:9/"],
                                                  "files": {"cifar-10-python.tar.gz": "md5:" + "0" * 32}})
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "cifar10") in msg


# --- Missing, changed and malformed files (issue 11 item 5, issue 13): one message naming the file and record ---


def test_missing_idx_files_are_named_at_once(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert name in str(e.value)
    # train files present: training loads, and the test split names only the two files it lacks
    files = write_mnist(tmp_path / "mnist")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        files[name].unlink()
    assert len(load_dataset("mnist", data_dir=tmp_path, download=False)) == 12
    with pytest.raises(DataError, match="not found: t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz. Get"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)


def test_offline_names_all_files_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(dl.RESOURCES, "mnist", {**dl.RESOURCES["mnist"], "mirrors": ["http://127.0.0.1:9/"]})
    root = tmp_path / "data" / "deeper"
    with pytest.raises(DataError) as e:
        load_dataset("mnist", "test", data_dir=root)
    msg = str(e.value)
    assert all(n in msg for n in dl.RESOURCES["mnist"]["files"]) and str(root / "mnist") in msg
    assert not (tmp_path / "data").exists()  # every folder this call created is gone again


def test_files_that_differ_from_the_published_ones_warn(tmp_path, http_server, monkeypatch):
    write_mnist(tmp_path / "mnist")
    with pytest.warns(dl.DataWarning, match="train-images-idx3-ubyte.gz differs from the published") as record:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert len(record) == 2  # the split's two files, each named
    root, url = http_server
    _serve_mnist(root, monkeypatch, url)  # these very files as the "published" ones
    for name in dl.RESOURCES["mnist"]["files"]:
        (tmp_path / "mnist" / name).write_bytes((root / name).read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error", dl.DataWarning)
        assert len(load_dataset("mnist", "test", data_dir=tmp_path, download=False)) == 5


def test_idx_of_another_dtype_or_bad_labels(tmp_path):
    files = write_mnist(tmp_path / "mnist", gz=False)
    raw = bytearray(files["train-images-idx3-ubyte"].read_bytes())
    raw[2] = 0x0B
    files["train-images-idx3-ubyte"].write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-images-idx3-ubyte holds int16 values"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    files["t10k-labels-idx1-ubyte"].write_bytes(idx_bytes(np.array([0, 1, 2, 12, 4])))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: record 3 has label 12, outside 0..9"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((3, 3072), np.float64), [1, 2, 3], "pixel values are float64"),
    (np.full((3, 3072), 300, np.int64), [1, 2, 3], "pixel values span 300..300, outside 0..255"),
    (np.zeros((3, 3072), np.uint8), [1, 2, 10], "record 2 has label 10"),
    (np.zeros((3, 3072), np.uint8), [1.0, 2.0, 3.0], "labels are float64"),
])
def test_cifar_batch_values_are_checked(tmp_path, data, labels, message):
    batches = write_cifar(tmp_path / "cifar10")
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    with pytest.raises(DataError, match=f"test_batch: {message}"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


def test_truncated_archive_leaves_no_half_extracted_folder(tmp_path):
    archive = write_cifar_archive(tmp_path)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot extract"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]


def _fer(tmp_path, rows):
    (tmp_path / "fer2013").mkdir(exist_ok=True)
    pixels = " ".join(["7"] * 48 * 48)
    lines = ["emotion,pixels,Usage", f"0,{pixels},Training"] + [r.format(pixels=pixels) for r in rows]
    (tmp_path / "fer2013" / "fer2013.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("row, message", [
    ("1,{pixels} 300,Training", "line 3 has 2305 pixel values"),
    ("1,300 {pixels},Training", "line 3 has 2305 pixel values"),
    ("1,x" + " 1" * 2303 + ",Training", "line 3: pixel value 'x' is not an integer"),
    ("1,-1" + " 1" * 2303 + ",Training", "line 3: pixel value -1 is outside 0..255"),
    ("1,256" + " 1" * 2303 + ",Training", "line 3: pixel value 256 is outside 0..255"),
    ("9,{pixels},Training", "line 3: label '9' is not an integer in 0..6"),
    ("happy,{pixels},Training", "line 3: label 'happy'"),
    ("1,{pixels}", "line 3 has too few columns"),
])
def test_fer2013_rows_that_cannot_be_parsed(tmp_path, row, message):
    _fer(tmp_path, [row])
    with pytest.raises(DataError, match=message):
        load_dataset("fer2013", data_dir=tmp_path)


def _class_folders(root, classes=("a", "b"), n=10, size=(12, 12), mode="L"):
    from PIL import Image

    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new(mode, size, 40 * i).save(root / cls / f"{i}.png")


def test_folder_class_without_images(tmp_path):
    _class_folders(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'empty'} has no images"):
        load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)


def test_folder_of_too_few_images_for_a_held_out_split_says_so(tmp_path):
    """It said "no images found in the class folders", which hold 6."""
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(tmp_path / cls / f"{i}.png")
    assert len(load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)) == 6
    with pytest.raises(DataError, match=r"none of the 6 images in the class folders of .* is in this split: without "
                                        r"train/ and test/ folders the 10th image of each class"):
        load_dataset("folder", "test", data_dir=tmp_path, image_size=8, channels=1)


def test_folder_splits_share_the_train_classes(tmp_path):
    _class_folders(tmp_path / "train", ("a", "b", "c"))
    _class_folders(tmp_path / "test", ("a", "c"))
    with pytest.raises(DataError, match="class folder .*test/b does not exist"):
        load_dataset("folder", "test", data_dir=tmp_path, image_size=8, channels=1)
    _class_folders(tmp_path / "test", ("b", "d"))
    with pytest.raises(DataError, match="class folders that .*train lacks: d"):
        load_dataset("folder", "test", data_dir=tmp_path, image_size=8, channels=1)
    shutil.rmtree(tmp_path / "test" / "d")
    test = load_dataset("folder", "test", data_dir=tmp_path, image_size=8, channels=1)
    assert test.class_names == ["a", "b", "c"] and test.labels.bincount().tolist() == [10, 10, 10]


def test_folder_transparent_pixels_read_over_white(tmp_path):
    # A sprite: black strokes on a transparent background (its transparent pixels hold black too). convert()
    # alone gave a black square; a viewer shows black on white. Opaque images read as before.
    from PIL import Image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 3, 3] = 255  # a vertical black stroke, opaque; everything else transparent black
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(rgba).save(tmp_path / cls / "sprite.png")
        Image.fromarray(rgba[..., 0]).save(tmp_path / cls / "opaque.png")
        Image.fromarray(rgba[..., 0], "L").convert("P").save(tmp_path / cls / "palette.gif", transparency=0)
    d = load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)  # every 10th held out: none of 3
    sprite, opaque, palette = (d.images[d.labels == 0][i, 0] for i in (2, 0, 1))  # name order: opaque, palette, sprite
    assert sprite[2:6, 3].tolist() == [0] * 4 and int(sprite.min()) == 0 and int(sprite.max()) == 255
    assert int((sprite == 255).sum()) == 60 and int(opaque.max()) == 0  # 64 pixels, 4 of them the stroke
    assert int((palette == 255).sum()) == 64  # palette index 0 (black) is the transparent one


def test_folder_with_one_split_folder(tmp_path):
    # DIR/train/<class>/ without DIR/test/: train/ is the class root and every 10th image is held out (it was
    # taken for a class named "train", and the error said to remove the folder: the whole dataset)
    _class_folders(tmp_path / "train", ("a", "b"))
    train = load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)
    test = load_dataset("folder", "test", data_dir=tmp_path, image_size=8, channels=1)
    assert train.class_names == ["a", "b"] and (len(train), len(test)) == (18, 2)
    # a class that is named "train" (images in it, beside other classes) is still a class
    _class_folders(tmp_path / "other", ("bus", "train"))
    assert load_dataset("folder", data_dir=tmp_path / "other", image_size=8, channels=1).class_names == ["bus", "train"]
    shutil.move(tmp_path / "train", tmp_path / "test")
    with pytest.raises(DataError, match="has a test/ folder of classes but no train/"):
        load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)


def test_folder_image_too_large_to_decode(tmp_path, monkeypatch):
    from PIL import Image

    _class_folders(tmp_path, size=(30, 20))
    monkeypatch.setattr(formats, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(DataError, match=r"a/0.png is 30x20 pixels, more than fastdiff decodes \(500\)"):
        load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)
    monkeypatch.undo()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own bomb check fires first (600 > 2 x 100)
    with pytest.raises(DataError, match="a/0.png is too large to decode safely"):
        load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)


def test_folder_16_bit_image_is_refused_not_clipped(tmp_path):
    from PIL import Image

    _class_folders(tmp_path)
    Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(tmp_path / "b" / "deep.png")
    with pytest.raises(DataError, match=r"deep.png has I;?1?6? pixels \(16-bit or float\)"):
        load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)


def test_folder_damaged_png_is_one_error(tmp_path):
    # A PNG whose second data chunk is damaged: PIL's decoder raises SyntaxError ("broken PNG file"), which came
    # out as a traceback; it is one error naming the file, like any other unreadable image.
    import io

    from PIL import Image

    _class_folders(tmp_path)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)  # PIL writes 64 KiB per chunk: 90 KB is two
    data[second:second + 4] = b"L\x95&\xd7"
    (tmp_path / "b" / "broken.png").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"cannot read image .*b/broken.png: broken PNG file.*remove or replace it"):
        load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)


def test_folder_skips_hidden_files_and_turns_photos_upright(tmp_path):
    # A Mac zip's "._0.png" metadata beside an image is not an image (it failed the load, or a hidden image was
    # trained); a photo stored sideways with an EXIF orientation reads as a viewer shows it.
    from PIL import Image

    _class_folders(tmp_path)
    (tmp_path / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
    Image.new("L", (12, 12), 255).save(tmp_path / "b" / ".thumb.png")
    d = load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1)
    assert len(d) == 18 and d.class_names == ["a", "b"]  # 10 + 10 images, every 10th held out
    photo = np.zeros((20, 40), np.uint8)
    photo[:, :20] = 255  # stored: left half white; orientation 6 (rotate 90 clockwise to view): top half white
    exif = Image.Exif()
    exif[0x0112] = 6
    shutil.rmtree(tmp_path / "b")
    (tmp_path / "b").mkdir()
    for i in range(10):
        Image.fromarray(photo).save(tmp_path / "b" / f"{i}.jpg", exif=exif, quality=95)
    img = load_dataset("folder", data_dir=tmp_path, image_size=8, channels=1).images
    upright = img[-1, 0].float()
    assert upright[:3].mean() > 200 and upright[-3:].mean() < 50  # top white, bottom black (uint8)


def test_data_dir_with_a_tilde_or_naming_a_file(tmp_path, monkeypatch):
    # "~/data" from a config file reaches the reader unexpanded (the shell expands flags only): it is the home
    # folder's, not a folder named "~" in the current one. A --data-dir that is a file says so.
    from fastdiff.cli.args import absolute_data_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    _class_folders(tmp_path / "pics")
    assert load_dataset("folder", data_dir="~/pics", image_size=8, channels=1).class_names == ["a", "b"]
    assert absolute_data_dir({"data.data_dir": "~/pics"}) == {"data.data_dir": str(tmp_path / "pics")}
    (tmp_path / "fer2013.csv").write_text("emotion,pixels,Usage\n")
    with pytest.raises(DataError, match=r"fer2013.csv is a file; pass the folder that holds fer2013.csv"):
        load_dataset("fer2013", data_dir=tmp_path / "fer2013.csv")
    with pytest.raises(DataError, match=r"image folder .*fer2013.csv is a file"):
        load_dataset("folder", data_dir=tmp_path / "fer2013.csv", image_size=8, channels=1)


def test_training_on_an_image_folder_needs_its_size_and_channels_chosen(tmp_path, capsys):
    # Without a preset an image folder took the default preset's 8x8 grayscale without a word (RGB photos
    # trained as 8x8 gray). The flags, a config file's model section or a --preset choose them.
    from fastdiff.cli import main

    _class_folders(tmp_path / "pics", mode="RGB")
    base = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "pics"), "--dry-run"]
    assert main([*base, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pass --image-size (e.g. 32; preset digits's is 8) and --channels (1 or 3" in err
    assert main([*base, "--image-size", "16", "--out", str(tmp_path / "r")]) == 2
    assert "pass --channels" in capsys.readouterr().err
    assert main([*base, "--image-size", "16", "--channels", "3", "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    (tmp_path / "c.toml").write_text("[model]\nimage_size = 16\nin_channels = 3\n")
    assert main([*base, "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "r")]) == 0
    assert main([*base, "--preset", "cifar10-ddpm", "--out", str(tmp_path / "r")]) == 0
    assert not (tmp_path / "r").exists()


def test_a_resume_on_renamed_class_folders_is_refused(tmp_path, capsys):
    # An image folder's labels are its sorted class folders: one renamed (dog -> ant) gave label 0 to the other
    # class, and the resume trained on without a word. Checkpoints record the classes; the resume checks them.
    from fastdiff.cli import main

    _class_folders(tmp_path / "pics", ("cat", "dog"))
    args = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "pics"), "--image-size", "8", "--channels",
            "1", "--num-classes", "2", "--batch-size", "4", "--ckpt-every", "1",
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*args, "--steps", "1"]) == 0
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["classes"] == ["cat", "dog"]
    (tmp_path / "pics" / "dog").rename(tmp_path / "pics" / "ant")
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "classes (labels 0, 1, ...) are ant, cat, but" in err and "trained on cat, dog" in err
    (tmp_path / "pics" / "ant").rename(tmp_path / "pics" / "dog")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "2", "--no-progress"]) == 0
