"""Shared fixtures: a tiny synthetic dataset (generated once per session) and tiny configs."""
from __future__ import annotations

import os
from pathlib import Path

# MKL's multithreaded GEMM may sum in another order from one call to the next (seen on 2 cores for a
# one-image chunk whose last layer is 1x1): conditional numerical reproducibility makes the bitwise
# comparisons of resumed, distributed and interrupted runs meaningful. Set before torch loads MKL;
# subprocesses (torchrun, killed runs) inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_LABELS = ["cardiomegaly", "pleural_effusion_right", "pleural_effusion_left"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dataset-cache")


@pytest.fixture(scope="session", autouse=True)
def user_data_home(tmp_path_factory):
    """The per-user data folder (the privacy ledger's default) of the whole session, never the real
    user's: a config that leaves output.ledger null books its runs here."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("user-data-home")
        patch.setenv("XDG_DATA_HOME", str(folder))
        yield folder


def write_tiny_config(folder: Path, data_cache: Path, **sections) -> Path:
    """``folder/config.yaml``: a small, fast config training into ``folder/experiments/tiny``, with
    ``sections`` overriding keys (for module-scoped experiments too, which cannot use ``tiny_config``)."""
    raw = yaml.safe_load((REPO / "configs" / "config.yaml").read_text())
    raw["data"].update(root=str(data_cache), image_size=32, labels=TINY_LABELS,
                       synthetic={"public_patients": 30, "private_patients": 120})
    raw["training"].update(epochs=2, logical_batch_size=16, physical_batch_size=8, device="cpu")
    raw["output"]["target_dir"] = str(folder / "experiments")
    raw["output"]["ledger"] = str(folder / "ledger")  # a test's own: the session's runs share the synthetic patients
    raw["model"]["pretrained_checkpoint"] = None  # from scratch: the public pretraining has tests of its own
    raw["pretraining"]["dir"] = str(folder / "pretrained")
    raw["experiment"]["name"] = "tiny"
    raw["dp"]["reproducible_noise"] = True  # runs are compared bitwise; tests of secret noise turn it off
    for section, values in sections.items():
        raw[section].update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tiny_config(tmp_path, data_cache):
    """Write a small, fast config and return a function producing its path with extra overrides."""

    def make(**sections) -> Path:
        return write_tiny_config(tmp_path, data_cache, **sections)

    return make


def assert_tensors_close(got, want, rtol: float, what: str) -> None:
    """Each tensor of ``got`` equals ``want`` to ``rtol`` of its own largest entry, with an absolute
    floor of 64 units of rounding of the dtype at the scale of the whole list (a gradient that is truly
    zero, e.g. a conv bias before a GroupNorm, is rounding noise on both sides, 1e-17 in float64)."""
    scale = max(float(w.abs().max()) for w in want if w.numel()) if any(w.numel() for w in want) else 0.0
    floor = 64 * torch.finfo(want[0].dtype).eps * scale
    for k, (g, w) in enumerate(zip(got, want)):
        if not w.numel():
            continue
        off, allowed = float((g - w).abs().max()), rtol * float(w.abs().max()) + floor
        assert off <= allowed, f"{what}: parameter {k} off by {off:.2e}, allowed {allowed:.2e}"


def assert_report(path: Path, headings: list[str], min_figures: int) -> None:
    """The report parses as HTML, has the sections, and embeds real PNG figures (opens offline)."""
    import base64
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.headings, self.tables, self._in_h2 = [], [], 0, False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images.append(attrs.get("src", ""))
            self.tables += tag == "table"
            self._in_h2 = tag == "h2"

        def handle_data(self, data):
            if self._in_h2:
                self.headings.append(data)
                self._in_h2 = False

    parser = Collect()
    parser.feed(path.read_text())
    assert all(any(h in found for found in parser.headings) for h in headings), parser.headings
    assert parser.tables >= 1 and len(parser.images) >= min_figures
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")  # embedded, nothing to fetch
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
