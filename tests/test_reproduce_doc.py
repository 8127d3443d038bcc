"""docs/reproduce.md uses only commands that exist, and its storage table follows from
the models' shapes."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from tests.cluster.test_cluster_readme import parse_error, vitcnn_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "reproduce.md"


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)


def _vitcnn_commands(text: str) -> list[list[str]]:
    """Every ``vitcnn ...`` command of the bash blocks (heredoc bodies skipped)."""
    out = []
    for block in _blocks(text):
        block = re.sub(r"<<'EOF'\n.*?^EOF$", "", block, flags=re.M | re.S)
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "do":
                words = words[1:]
            if words and words[0] == "vitcnn":
                out.append(words[1:])
    return out


def test_every_command_parses_with_the_cli() -> None:
    cmds = _vitcnn_commands(DOC.read_text(encoding="utf-8"))
    assert len(cmds) >= 20
    kinds = {(c[0], c[1] if c[0] == "analyze" else "") for c in cmds}
    assert {("extract", ""), ("verify", ""), ("report", "")} <= kinds
    assert {("analyze", a) for a in ("cka", "attention", "skip", "localization", "probe")} <= kinds
    for argv in cmds:
        assert parse_error(vitcnn_parser(), argv) is None, argv


def test_the_sampling_snippet_compiles() -> None:
    snippets = re.findall(r"<<'EOF'\n(.*?)^EOF$", DOC.read_text(encoding="utf-8"), re.M | re.S)
    assert snippets
    for code in snippets:
        compile(code, "reproduce.md", "exec")


@cache
def _model(name: str) -> object:
    """The model on the meta device: shapes without weights (fast, no memory)."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).eval()


def _values_per_image(name: str, layers: str) -> tuple[int, int]:
    """Values per image of the selected layers' outputs, and of every block's attention
    probabilities (heads × tokens², as ``--attention`` stores them), at 224 px."""
    import torch

    from vitcnn_store.models import attention_modules, expand_layers

    model = _model(name)
    found: dict[str, int] = {}
    tokens: list[int] = []
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: found.__setitem__(n, out[0].numel())
        )
        for n in expand_layers(model, layers)
    ]
    heads = [model.get_submodule(n).num_heads for n in attention_modules(model)]
    if heads:
        hooks.append(
            model.get_submodule("norm_pre").register_forward_hook(
                lambda _m, _i, out: tokens.append(out.shape[1])
            )
        )
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, device="meta"))
    for h in hooks:
        h.remove()
    return sum(found.values()), sum(h * tokens[0] ** 2 for h in heads) if heads else 0


@pytest.mark.parametrize(
    ("model", "layers", "row"),
    [
        ("vit_base_patch16_224", "preset:blocks", "`vitb16`"),
        ("vit_base_patch16_224", "norm_pre", "`vitb16_att`"),
        ("vit_base_patch16_224", "preset:blocks,blocks.*.attn,blocks.*.mlp", "`vitb16_skip`"),
        ("vit_large_patch16_224", "preset:blocks", "`vitl16`"),
        ("vit_large_patch16_224", "norm_pre", "`vitl16_att`"),
        ("resnet50", "preset:blocks", "`r50`"),
        ("resnet50", "preset:paper", "`r50_skip`"),
        ("resnetv2_50x1_bit", "preset:paper", "`bit50_skip`"),
        ("vit_base_patch32_224", "preset:all", "`vitb32_all`"),
        ("resnetv2_50x1_bit", "preset:all", "`bit50_all`"),
        ("vit_large_patch16_224", "preset:all", "`vitl16_all`"),
        ("vit_huge_patch14_224", "preset:all", "`vith14_all`"),
        ("resnetv2_152x2_bit", "preset:all", "`bit152_all`"),
        ("vit_base_patch32_224", "norm_pre", "`vitb32_att`"),
        ("vit_huge_patch14_224", "norm_pre", "`vith14_att`"),
    ],
)
def test_storage_table_follows_from_shapes(model: str, layers: str, row: str) -> None:
    values, attention = _values_per_image(model, layers)
    line = next(x for x in DOC.read_text(encoding="utf-8").splitlines() if x.startswith(f"| {row}"))
    stated = [float(v) for v in re.findall(r"([\d.]+) MB", line)]
    if row.endswith("_att`"):  # attention, then the token layer giving positions
        assert stated[:2] == [round(attention * 2 / 1e6, 2), round(values * 2 / 1e6, 2)]
    else:
        assert stated[0] == round(values * 2 / 1e6, 2)
        assert stated[1:] in ([], [round(224 * 224 * 3 * 2 / 1e6, 2)])  # the stored input
    # The total: the stated MB per image × images, in GB.
    cells = [c.strip() for c in line.strip("|").split("|")]
    images = int(cells[3].replace(",", ""))
    total = float(re.fullmatch(r"([\d.]+) GB", cells[4]).group(1))  # type: ignore[union-attr]
    assert total == round(sum(stated[:2]) * images / 1000)
