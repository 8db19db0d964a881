"""Tests for adapters/archive.py: good uploads extract, hostile ones are refused and leave dest empty."""
from __future__ import annotations

import gzip
import io
import json
import pathlib
import stat
import tarfile
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from loraplex.adapters import archive
from loraplex.adapters.archive import UploadLimits, extract_adapter_archive
from loraplex.adapters.errors import AdapterError, AdapterTooLargeError

MB = 1_000_000


def adapter_files(tmp_path: pathlib.Path) -> dict[str, bytes]:
    """A tiny fake PEFT adapter: a config and a valid safetensors file."""
    weights = tmp_path / "weights.safetensors"
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 16),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(16, 4)}, str(weights))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": weights.read_bytes()}


def make_zip(path: pathlib.Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> pathlib.Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on the duplicate-name case
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


def make_tgz(path: pathlib.Path, entries: list[tuple[str | tarfile.TarInfo, bytes | None]],
             tar_format: int = tarfile.PAX_FORMAT) -> pathlib.Path:
    with tarfile.open(path, "w:gz", format=tar_format) as tf:
        for entry, data in entries:
            info = entry if isinstance(entry, tarfile.TarInfo) else tarfile.TarInfo(entry)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_info(name: str, kind: bytes, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


@pytest.fixture
def dest(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "dest"
    path.mkdir()
    return path


@pytest.fixture
def files(tmp_path: pathlib.Path) -> dict[str, bytes]:
    return adapter_files(tmp_path)


def refused(src: pathlib.Path, dest: pathlib.Path, error: type[AdapterError],
            limits: UploadLimits = UploadLimits()) -> str:
    with pytest.raises(error) as info:
        extract_adapter_archive(src, dest, limits)
    assert list(dest.iterdir()) == [], "dest must be left empty"
    message = str(info.value)
    assert "\n" not in message
    return message


# --- good uploads ------------------------------------------------------------------------------

def test_good_zip(tmp_path, dest, files):
    src = make_zip(tmp_path / "upload.bin", [*files.items(), ("README.md", b"hi"), ("inner.zip", b"PK\x03\x04")])
    root = extract_adapter_archive(src, dest, UploadLimits())
    assert root == dest
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    # A nested archive is just a file.
    assert (root / "inner.zip").read_bytes() == b"PK\x03\x04"


def test_good_tgz(tmp_path, dest, files):
    # The name says zip; the magic bytes say tar.gz, and they win.
    src = make_tgz(tmp_path / "upload.zip", [(tar_info(".", tarfile.DIRTYPE), None), *files.items()])
    root = extract_adapter_archive(src, dest, UploadLimits())
    assert root == dest
    assert {p.name for p in dest.iterdir()} == set(files)


def test_single_top_level_folder(tmp_path, dest, files):
    src = make_tgz(tmp_path / "a.tgz", [(tar_info("my-adapter", tarfile.DIRTYPE), None),
                                        *((f"my-adapter/{n}", d) for n, d in files.items())])
    assert extract_adapter_archive(src, dest, UploadLimits()) == dest / "my-adapter"
    src = make_zip(tmp_path / "a.zip", [(f"my-adapter/{n}", d) for n, d in files.items()]
                   + [("__MACOSX/my-adapter/._adapter_config.json", b"junk")])
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    root = extract_adapter_archive(src, dest2, UploadLimits())
    assert root == dest2 / "my-adapter"
    assert (root / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
    assert not (dest2 / "__MACOSX").exists()


def test_dest_must_be_empty(tmp_path, dest, files):
    (dest / "keep").write_text("x")
    with pytest.raises(ValueError):
        extract_adapter_archive(make_zip(tmp_path / "a.zip", list(files.items())), dest, UploadLimits())
    assert (dest / "keep").read_text() == "x"


def test_limits_validate():
    with pytest.raises(ValueError):
        UploadLimits(max_files=0)
    with pytest.raises(ValueError):
        UploadLimits(max_total_bytes=-1)


# --- hostile names and types ---------------------------------------------------------------------

@pytest.mark.parametrize("bad_name", ["../x", "a/../../x", "/etc/x", "C:/x", "a\\b", "a\nb", "a//b", "."])
def test_bad_names_zip(tmp_path, dest, files, bad_name):
    src = make_zip(tmp_path / "a.zip", [*files.items(), (bad_name, b"evil")])
    refused(src, dest, AdapterError)


@pytest.mark.parametrize("bad_name", ["../x", "/etc/x", "a\\b"])
def test_bad_names_tgz(tmp_path, dest, files, bad_name):
    src = make_tgz(tmp_path / "a.tgz", [*files.items(), (bad_name, b"evil")])
    message = refused(src, dest, AdapterError)
    assert repr(bad_name) in message


def test_nul_in_zip_name(tmp_path, dest, files):
    src = make_zip(tmp_path / "a.zip", [*files.items(), ("aQQQb", b"evil")])
    src.write_bytes(src.read_bytes().replace(b"aQQQb", b"a\x00QQb"))  # zipfile cannot write a NUL itself
    assert "NUL" in refused(src, dest, AdapterError)


def test_zip_symlink(tmp_path, dest, files):
    link = zipfile.ZipInfo("link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    src = make_zip(tmp_path / "a.zip", [*files.items(), (link, b"/etc/passwd")])
    assert "symlink" in refused(src, dest, AdapterError)


@pytest.mark.parametrize("kind,word", [(tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hardlink"),
                                       (tarfile.FIFOTYPE, "fifo"), (tarfile.CHRTYPE, "device"),
                                       (tarfile.BLKTYPE, "device")])
def test_tar_links_and_devices(tmp_path, dest, files, kind, word):
    src = make_tgz(tmp_path / "a.tgz", [*files.items(), (tar_info("x", kind, linkname="/etc/passwd"), None)])
    message = refused(src, dest, AdapterError)
    assert word in message and "'x'" in message


def test_duplicate_names(tmp_path, dest, files):
    src = make_zip(tmp_path / "a.zip", [*files.items(), ("adapter_config.json", b"{}")])
    assert "more than once" in refused(src, dest, AdapterError)
    src = make_tgz(tmp_path / "a.tgz", [*files.items(), ("x", b"1"), (tar_info("x", tarfile.DIRTYPE), None)])
    refused(src, dest, AdapterError)


@pytest.mark.parametrize("pickle_name", ["adapter_model.bin", "sub/opt.PT", "x.pkl", "x.npy", "x.ckpt"])
def test_pickle_member(tmp_path, dest, files, pickle_name):
    src = make_zip(tmp_path / "a.zip", [*files.items(), (pickle_name, b"\x80\x04.")])
    assert "adapter_model.safetensors" in refused(src, dest, AdapterError)


# --- sizes and counts ------------------------------------------------------------------------------

def test_zip_bomb(tmp_path, dest, files):
    src = make_zip(tmp_path / "bomb.zip", [*files.items(), ("zeros", bytes(50 * MB))])
    assert src.stat().st_size < 200_000
    refused(src, dest, AdapterTooLargeError, UploadLimits(max_total_bytes=1 * MB))
    refused(src, dest, AdapterTooLargeError, UploadLimits(max_file_bytes=1 * MB))


def test_zip_with_lying_sizes(tmp_path, dest, files):
    # The headers claim 7 bytes; the deflate stream holds 50 MB of zeros.
    src = make_zip(tmp_path / "liar.zip", [*files.items(), ("zeros", bytes(50 * MB))])
    raw = bytearray(src.read_bytes())
    size_field = (50 * MB).to_bytes(4, "little")
    assert raw.count(size_field) == 2  # the local header and the central directory entry
    src.write_bytes(bytes(raw).replace(size_field, (7).to_bytes(4, "little")))
    refused(src, dest, AdapterError, UploadLimits(max_total_bytes=1 * MB))


@pytest.mark.parametrize("suffix", ["zip", "tgz"])
def test_bytes_written_are_counted(tmp_path, dest, files, monkeypatch, suffix):
    # Pretend every header declared 0 bytes (a lie the stdlib readers did not catch): the
    # writer's own count must still stop the extraction.
    real_add = archive._Plan.add
    monkeypatch.setattr(archive._Plan, "add", lambda self, raw, is_dir, _: real_add(self, raw, is_dir, 0))
    entries = [*files.items(), ("zeros", bytes(5 * MB))]
    src = make_zip(tmp_path / "a.zip", entries) if suffix == "zip" else make_tgz(tmp_path / "a.tgz", entries)
    for limits in (UploadLimits(max_file_bytes=MB), UploadLimits(max_total_bytes=MB)):
        assert "decompresses to more than" in refused(src, dest, AdapterTooLargeError, limits)


def test_tar_bomb(tmp_path, dest, files):
    src = make_tgz(tmp_path / "bomb.tgz", [*files.items(), ("zeros", bytes(50 * MB))])
    assert src.stat().st_size < 200_000
    refused(src, dest, AdapterTooLargeError, UploadLimits(max_total_bytes=1 * MB))


def test_tar_header_lies_about_size(tmp_path, dest, files):
    # The header declares 10 MB but the stream ends after a few bytes.
    good = make_tgz(tmp_path / "good.tgz", [*files.items(), ("x", bytes(10 * MB))],
                    tar_format=tarfile.USTAR_FORMAT)
    raw = gzip.decompress(good.read_bytes())
    truncated = raw[:raw.index(b"ustar", len(raw) - 10 * MB - 2048) + 512]
    src = tmp_path / "liar.tgz"
    src.write_bytes(gzip.compress(truncated))
    assert "'x'" in refused(src, dest, AdapterError)


def test_tar_oversized_pax_header(tmp_path, dest, files):
    # tarfile reads a pax header whole into memory; a huge one must be refused before that.
    info = tarfile.TarInfo("x")
    info.pax_headers = {"comment": "c" * (8 * MB)}
    src = make_tgz(tmp_path / "pax.tgz", [*files.items(), (info, b"1")])
    refused(src, dest, AdapterTooLargeError)


def test_too_many_files(tmp_path, dest, files):
    src = make_zip(tmp_path / "a.zip", [*files.items(), ("README.md", b"x")])
    refused(src, dest, AdapterTooLargeError, UploadLimits(max_files=2))
    src = make_tgz(tmp_path / "a.tgz", [*files.items(), ("README.md", b"x")])
    refused(src, dest, AdapterTooLargeError, UploadLimits(max_files=2))


def test_too_many_directories(tmp_path, dest, files):
    dirs = [(tar_info(f"d{i}", tarfile.DIRTYPE), None) for i in range(200)]
    refused(make_tgz(tmp_path / "a.tgz", [*files.items(), *dirs]), dest, AdapterTooLargeError)


def test_oversize_archive(tmp_path, dest, files):
    src = make_zip(tmp_path / "a.zip", list(files.items()))
    refused(src, dest, AdapterTooLargeError, UploadLimits(max_archive_bytes=src.stat().st_size - 1))


# --- not an adapter archive ------------------------------------------------------------------------

def test_not_an_archive(tmp_path, dest):
    src = tmp_path / "a.zip"
    src.write_bytes(b"hello, this is not a zip")
    refused(src, dest, AdapterError)
    src.write_bytes(gzip.compress(b"a gzip that holds no tar"))
    refused(src, dest, AdapterError)


def test_uncompressed_tar(tmp_path, dest, files):
    src = tmp_path / "a.tar"
    with tarfile.open(src, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert "gzip" in refused(src, dest, AdapterError)


def test_missing_config_or_weights(tmp_path, dest, files):
    src = make_zip(tmp_path / "a.zip", [("adapter_model.safetensors", files["adapter_model.safetensors"])])
    assert "adapter_config.json" in refused(src, dest, AdapterError)
    src = make_tgz(tmp_path / "a.tgz", [("adapter_config.json", files["adapter_config.json"])])
    assert "adapter_model.safetensors" in refused(src, dest, AdapterError)
    # Two top-level folders: which one is the adapter is ambiguous.
    src = make_zip(tmp_path / "b.zip", [*((f"a/{n}", d) for n, d in files.items()), ("b/x", b"")])
    refused(src, dest, AdapterError)


def test_corrupt_member_data_leaves_dest_empty(tmp_path, dest, files):
    src = make_zip(tmp_path / "a.zip", [*files.items(), ("z", bytes(100_000))])
    raw = bytearray(src.read_bytes())
    # Flip bytes inside the last member's compressed data, after the good files were written.
    offset = raw.rindex(b"PK\x03\x04") + 30 + 1 + 20
    raw[offset:offset + 8] = b"\xff" * 8
    src.write_bytes(bytes(raw))
    refused(src, dest, AdapterError)
