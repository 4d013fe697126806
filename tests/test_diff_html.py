"""The HTML diff page in a real browser: headless Chromium draws the highlighted nodes; names are escaped."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

import graftlib
from graftlib.diff import HIGHLIGHT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="no chromium here (CI installs it and must not skip)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM, "chromium is required under CI: apt-get install chromium"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into rows of pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(bytes(line))
        previous = line
    return width, channels, rows


def _highlight_bands(path: Path, hex_colour: str, tolerance: int = 12) -> tuple[int, int]:
    """(pixels of the colour, horizontal bands of rows that hold at least 20 of them)."""
    target = bytes.fromhex(hex_colour.lstrip("#"))
    width, channels, rows = _png_pixels(path)
    total, bands, inside = 0, 0, False
    for row in rows:
        hits = sum(1 for x in range(width)
                   if all(abs(row[x * channels + i] - target[i]) <= tolerance for i in range(3)))
        total += hits
        if hits >= 20 and not inside:
            bands += 1
        inside = hits >= 20
    return total, bands


def _svg(dom: str, cls: str) -> str:
    start = dom.index(f'<svg class="{cls}"')
    return dom[start:dom.index("</svg>", start)]


@pytest.fixture(scope="module")
def twelve_layers():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    return graftlib.apply(model, "lora(q,v,r=4)").eval()


@needs_chromium
def test_highlighted_nodes_are_drawn(tmp_path, twelve_layers):
    grafted = twelve_layers
    steps = sum(1 for n in grafted.runtime_module().graph.nodes
                if n.op == "call_function" and (n.meta.get("custom") or {}).get("graft"))
    page = tmp_path / "diff.html"
    page.write_text(grafted.diff().to_html())
    base_page = tmp_path / "base.html"
    with grafted.disable_adapters():
        base_page.write_text(grafted.diff().to_html())
    found = {}
    for name, html in (("grafted", page), ("base", base_page)):
        shot = tmp_path / f"{name}.png"
        result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", html.as_uri())
        assert shot.is_file(), result.stderr[-2000:]
        found[name] = _highlight_bands(shot, HIGHLIGHT)
    (pixels, bands), (base_pixels, base_bands) = found["grafted"], found["base"]
    print(f"highlight pixels {pixels} in {bands} bands; base page {base_pixels} in {base_bands}")
    assert pixels > 5000 and bands >= 5, "inserted nodes of several sites are drawn in the highlight colour"
    assert base_bands <= 1 and base_pixels < 500, "only the legend's swatch when nothing was inserted"
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _svg(dom.stdout, "overview").count('<g class="ins">') == steps == 24 * 3
    assert dom.stdout.count('<details class="site"') == 24


def test_page_is_self_contained(twelve_layers):
    html = twelve_layers.diff().to_html()
    assert not re.search(r"<(link|img|iframe|object)\b|<script[^>]*\bsrc=|url\(\s*['\"]?https?:", html)
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) == {"http://www.w3.org/2000/svg"}


class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module("<script>alert(1)</script>", nn.Linear(4, 4))

    def forward(self, x):
        return getattr(self, "<script>alert(1)</script>")(x)


@needs_chromium
def test_module_names_are_escaped(tmp_path):
    model = _Named()
    grafted = graftlib.apply(model, 'lora("*script*", r=2)', example_inputs=(torch.randn(2, 4),))
    html = grafted.diff().to_html()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = tmp_path / "escaped.html"
    page.write_text(html)
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<script>") == 1, "only the page's own script element exists"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout
