"""The grids that claim Fang et al.'s Tables 1-6 hold exactly those tables' cells, at the paper's rho_u, with
the paper's numbers beside them; and the grid features they need (a generator reading a clean classifier, TAP;
the ``paper:`` block and its rendering) work.

The transcriptions below cite the paper's text, ../shared/papers/001_7979b3883c294936.txt, by line. Each cell
is read from the expanded grid's stages (the composed configs and their overrides), not from the grid's labels:
(dataset, surrogate architecture, method, victim architecture, adversarial training radius).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from ue_lightning.grid import load_grid, run_grid
from ue_lightning.grid.render import markdown, render
from ue_lightning.grid.spec import Grid, Stage, setting

PAPER = REPO.parent / "shared" / "papers" / "001_7979b3883c294936.txt"
FIVE = ("vgg16", "resnet18", "resnet50", "densenet121", "wrn34_10")  # the victims of lines 165, 199 and 224
FOUR = ("vgg16", "resnet18", "resnet50", "densenet121")  # the surrogates of lines 163 and 224


def _cells(datasets, surrogates, methods, victims, radii) -> set[tuple]:
    """A table's cells; a clean cell has no surrogate."""
    return {(d, None if m == "Clean" else s, m, v, r)
            for d, s, m, v, r in itertools.product(datasets, surrogates, methods, victims, radii)}


#: Each grid's cells, transcribed from the paper. NTGA (Table 1's and Figure 1's) is not built: no NTGA here.
PAPER_CELLS = {
    # Table 1, lines 175-193: rows CIFAR-10, CIFAR-100, ImageNet subset x rho_a 0-4/255; columns Clean, EM, TAP,
    # (NTGA), REM, Ours; ResNet-18 surrogates (line 195) and victims (line 199)
    "table1": _cells(["cifar10", "cifar100", "imagenet_subset"], ["resnet18"], ["Clean", "EM", "TAP", "REM", "Ours"],
                     ["resnet18"], [0, 1, 2, 3, 4]),
    # Table 2, lines 199 and 207-220: CIFAR-10 and CIFAR-100 x VGG-16, RN-18, RN-50, DN-121, WRN-34-10 under
    # adversarial training at 4/255; columns Clean, EM, REM, Ours; noise from ResNet-18
    "table2": _cells(["cifar10", "cifar100"], ["resnet18"], ["Clean", "EM", "REM", "Ours"], FIVE, [4]),
    # Table 3, lines 228-242: CIFAR-10, surrogates x (EM, REM, Ours) rows, victims columns, standard training
    "table3": _cells(["cifar10"], FOUR, ["EM", "REM", "Ours"], FIVE, [0]),
    # Table 4, lines 244-258: the same on CIFAR-100
    "table4": _cells(["cifar100"], FOUR, ["EM", "REM", "Ours"], FIVE, [0]),
    # Table 5, lines 266-280: CIFAR-10, adversarial training at 4/255
    "table5": _cells(["cifar10"], FOUR, ["EM", "REM", "Ours"], FIVE, [4]),
    # Table 6, lines 282-296: CIFAR-100, adversarial training at 4/255
    "table6": _cells(["cifar100"], FOUR, ["EM", "REM", "Ours"], FIVE, [4]),
    # Figure 1, line 30: five methods on CIFAR-10 and CIFAR-100, rho_u 8/255, adversarial training at 4/255; our
    # reading (the text names neither the methods nor the models): Table 1's methods and rho_a-4/255 rows
    "figure1": _cells(["cifar10", "cifar100"], ["resnet18"], ["EM", "TAP", "REM", "Ours"], ["resnet18"], [4]),
}
METHODS = {"ErrorMinimizingNoise": "EM", "TargetedAdversarialPoison": "TAP"}


def _method(generator: Stage) -> str:
    name = str(setting(generator, "model.class_path")).rsplit(".", 1)[-1]
    if name == "RobustNoiseGenerator":  # data collapse is REM's loop with a score model
        return "Ours" if setting(generator, "model.init_args.score_checkpoint") else "REM"
    assert name != "ErrorMinimizingNoise" or setting(generator, "model.init_args.mode") == "samplewise"
    return METHODS[name]


def _noise(grid: Grid, victim: Stage) -> Stage | None:
    return next((grid.stages[k] for k in victim.needs if grid.stages[k].kind == "generator"), None)


def _surrogate(grid: Grid, generator: Stage) -> str:
    """The generator's model, or for TAP the clean classifier's it reads."""
    classifiers = [grid.stages[k] for k in generator.needs if grid.stages[k].kind == "victim"]
    return setting(classifiers[0] if classifiers else generator, "model.init_args.arch")


def cell_coordinates(grid: Grid) -> list[tuple]:
    """(dataset, surrogate, method, victim, rho_a) of each cell, from its stages' resolved settings."""
    out = []
    for cell in grid.cells:
        victim = grid.victim(cell)
        noise = _noise(grid, victim)
        out.append((setting(victim, "data.dataset"), _surrogate(grid, noise) if noise else None,
                    _method(noise) if noise else "Clean", setting(victim, "model.init_args.arch"),
                    setting(victim, "model.init_args.adv_radius")))
    return out


@pytest.fixture(scope="module")
def grids() -> dict[str, Grid]:
    with pytest.MonkeyPatch.context() as patch:  # a grid's paths are relative to the repository root
        patch.chdir(REPO)
        return {name: load_grid(REPO / "grids" / f"{name}.yaml") for name in PAPER_CELLS}


@pytest.mark.parametrize("name", PAPER_CELLS)
def test_grid_cells_are_the_papers_table(name, grids):
    grid = grids[name]
    cells = cell_coordinates(grid)
    assert len(cells) == len(set(cells)), "two cells of the grid are one cell of the paper"
    assert set(cells) == PAPER_CELLS[name]
    assert all(cell["defence"] == "none" and cell["protected_fraction"] in (None, 1.0) for cell in grid.cells)
    for stage in grid.stages.values():
        if stage.kind == "generator":  # rho_u 8/255 for every method (lines 173, 199, 224); REM's and ours
            assert setting(stage, "model.init_args.epsilon") == 8, stage.name  # against rho_a 4/255 (line 173)
            if _method(stage) in ("REM", "Ours"):
                assert setting(stage, "model.init_args.adv_radius") == 4, stage.name


def test_a_cell_added_or_missing_is_seen(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load((REPO / "grids" / "table2.yaml").read_text())
    raw.pop("paper")
    raw["adv_radii"] = [2, 4]
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(raw))
    assert set(cell_coordinates(load_grid(tmp_path / "more.yaml"))) > PAPER_CELLS["table2"]
    raw["adv_radii"], raw["victims"] = [4], {k: v for k, v in raw["victims"].items() if k != "vgg16"}
    (tmp_path / "fewer.yaml").write_text(yaml.safe_dump(raw))
    assert set(cell_coordinates(load_grid(tmp_path / "fewer.yaml"))) < PAPER_CELLS["table2"]


@pytest.mark.parametrize("name", [n for n in PAPER_CELLS if n.startswith("table")])
def test_paper_block_gives_every_cell_one_number(name, grids):
    grid = grids[name]
    assert grid.paper is not None and grid.paper.title == f"Fang et al., Table {name[-1]}"
    assert all(grid.paper.value(cell) is not None for cell in grid.cells)
    assert len(grid.paper.entries) == len(grid.cells)


# a few numbers, by hand from the paper: (grid, cell coordinates, number, line)
SPOT = [("table1", {"dataset": "cifar10", "source": "collapse", "adv_radius": 4}, 29.20, 183),
        ("table1", {"dataset": "imagenet_subset", "source": "tap", "adv_radius": 0}, 9.10, 189),
        ("table2", {"dataset": "cifar100", "source": "clean", "victim": "wrn34_10"}, 68.64, 220),
        ("table4", {"surrogate": "densenet121", "source": "em-samplewise", "victim": "vgg16"}, 1.00, 256),
        ("table6", {"surrogate": "resnet50", "source": "collapse", "victim": "wrn34_10"}, 22.89, 293)]


@pytest.mark.parametrize("name, where, number, line", SPOT, ids=[f"{s[0]}-line{s[3]}" for s in SPOT])
def test_paper_numbers_spot_checks(name, where, number, line, grids):
    grid = grids[name]
    found = {grid.paper.value(c) for c in grid.cells if all(c[a] == v for a, v in where.items())}
    assert found == {number}


@pytest.mark.skipif(not PAPER.is_file(), reason="the paper's text is beside the repository, not in it")
@pytest.mark.parametrize("name", [n for n in PAPER_CELLS if n.startswith("table")])
def test_paper_block_numbers_are_on_the_lines_they_cite(name):
    """Each line of a `paper:` block says `# line N`: its numbers are those of the paper's line N, in order (the
    paper's NTGA and Average columns, which no cell has, left out)."""
    paper = PAPER.read_text().split("\n")
    text = (REPO / "grids" / f"{name}.yaml").read_text()
    rows = re.findall(r"^\s+- \[(.*)\]\s+# line (\d+)", text, flags=re.M)
    assert len(rows) == {"table1": 15, "table2": 10}.get(name, 12)
    for values, line in rows:
        ours = [v.strip() for v in values.split(",") if re.fullmatch(r"\d+\.\d\d", v.strip())]
        printed = re.findall(r"\d+\.\d\d", re.sub(r"</?b>", "", paper[int(line) - 1]))
        it = iter(printed)
        assert all(v in it for v in ours), (name, line, ours, printed)  # a subsequence, in order
        assert len(printed) - len(ours) == {"table1": 1, "table2": 0}.get(name, 1)


# --- the grid features the paper's tables need -------------------------------------------------------------

def _write(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


DIGITS = {"datasets": {"d": str(REPO / "configs/data/digits.yaml")},
          "victims": {"v": str(REPO / "configs/victim/digits.yaml")}}
TAP = str(REPO / "configs/generator/tap.yaml")


def test_a_classifier_source_reads_the_clean_victims_checkpoint(tmp_path):
    grid = load_grid(_write(tmp_path / "g.yaml", {**DIGITS, "output": str(tmp_path / "out"),
                                                  "sources": {"clean": None, "tap": {"generator": TAP,
                                                                                     "classifier": "v"}},
                                                  "adv_radii": [0, 2]}))
    clean = grid.victim(next(c for c in grid.cells if c["source"] == "clean" and c["adv_radius"] == 0))
    tap = next(s for s in grid.stages.values() if s.kind == "generator")
    assert tap.needs == [clean.key]  # the grid's clean cell at rho_a 0 is the classifier: one stage
    assert setting(tap, "model.init_args.classifier_checkpoint") == str(clean.checkpoint)
    order = list(grid.stages)
    assert order.index(clean.key) < order.index(tap.key)  # submitted before the generator that waits for it
    assert len(grid.cells) == 4 and sum(s.kind == "victim" for s in grid.stages.values()) == 4


def test_a_classifier_not_among_the_cells_is_planned_as_a_stage(tmp_path):
    grid = load_grid(_write(tmp_path / "g.yaml", {**DIGITS, "sources": {"tap": {"generator": TAP, "classifier": "v"}},
                                                  "adv_radii": [2], "surrogates": {"wide": {"model.init_args.width": 8}}}))
    tap = next(s for s in grid.stages.values() if s.kind == "generator")
    classifier = grid.stages[tap.needs[0]]
    assert classifier.kind == "victim" and classifier.key not in {c["key"] for c in grid.cells}
    assert setting(classifier, "model.init_args.adv_radius") == 0 and classifier.cell["seed"] == 0
    assert setting(classifier, "model.init_args.width") == 8  # the surrogate's settings go to the classifier
    assert "--model.init_args.width" not in tap.args  # not to TAP, which has no model of its own


def test_classifier_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="classifier"):  # TAP without its classifier
        load_grid(_write(tmp_path / "a.yaml", {**DIGITS, "sources": {"tap": TAP}}))
    with pytest.raises(ValueError, match="not among the victims"):
        load_grid(_write(tmp_path / "b.yaml", {**DIGITS, "sources": {"tap": {"generator": TAP, "classifier": "x"}}}))
    with pytest.raises(ValueError, match="no generator"):
        load_grid(_write(tmp_path / "c.yaml", {**DIGITS, "sources": {"t": {"classifier": "v"}}}))


def test_an_overlay_named_after_the_one_the_grid_adds_is_merged_once(tmp_path):
    rem = str(REPO / "configs/generator/rem.yaml")
    grid = load_grid(_write(tmp_path / "g.yaml", {**DIGITS, "sources": {
        "a": rem, "b": [rem, str(REPO / "configs/generator/digits/rem.yaml")]}}))
    generators = [s for s in grid.stages.values() if s.kind == "generator"]
    assert len(generators) == 1 and len(generators[0].configs) == 3  # data, rem, its digits overlay


def test_tap_cell_runs_on_the_clean_classifier(tmp_path, fake_npz):
    """End to end: the clean victim trains, TAP reads its checkpoint, the TAP victim trains on that noise."""
    tiny = {"config": str(REPO / "configs/victim/resnet18-cpu.yaml"),
            "args": {"model.init_args.width": 4, "trainer.max_epochs": 1}}
    data = {"config": str(REPO / "configs/data/cifar10-npz-cpu.yaml"),
            "args": {"data.root": str(fake_npz), "data.train_subset": None, "data.batch_size": 32}}
    grid_file = _write(tmp_path / "tap.yaml", {
        "output": str(tmp_path / "out"), "datasets": {"fake": data}, "victims": {"r18w4": tiny},
        "sources": {"clean": None, "tap": {"generator": [TAP, str(REPO / "configs/generator/cifar10-npz-cpu/tap.yaml")],
                                           "classifier": "r18w4", "args": {"model.init_args.steps": 1}}}})
    run_grid(str(grid_file))
    grid = load_grid(grid_file)
    assert all(grid.victim(c).done() for c in grid.cells)
    metrics = json.loads(grid.victim(grid.cells[1]).result.read_text())
    assert metrics["source"] == "tap" and 0 <= metrics["test_acc"] <= 1


def _paper_grid(tmp_path: Path, paper: dict) -> Path:
    return _write(tmp_path / "p.yaml", {
        **DIGITS, "output": str(tmp_path / "out"),
        "sources": {"clean": None, "em": str(REPO / "configs/generator/em-classwise.yaml")},
        "adv_radii": [0, 2], "seeds": [0, 1], "paper": paper})


PAPER_BLOCK = {"title": "Somebody, Table 9", "rows": ["adv_radius"], "columns": {"source": ["clean", "em"]},
               "values": [[0, 90.0, 10.5], [2, 80.25, 70]]}


def test_paper_block_rendered_beside_ours(tmp_path):
    grid = load_grid(_paper_grid(tmp_path, PAPER_BLOCK))
    assert grid.paper.value(next(c for c in grid.cells if c["source"] == "em" and c["adv_radius"] == 2)) == 70.0
    results = []
    for cell in grid.cells:
        if cell["adv_radius"] == 0:
            result = {**cell, "test_acc": 0.2 if cell["source"] == "em" else 0.9, "train_acc": 1.0}
            grid.victim(cell).result.parent.mkdir(parents=True)
            grid.victim(cell).result.write_text(json.dumps(result))
            results.append(result)
    md = markdown(grid, results)
    assert "ours / Somebody, Table 9" in md
    assert "| clean | 90.0 ± 0.0 (2) / 90.00 | - / 80.25 |" in md
    assert "| em | 20.0 ± 0.0 (2) / 10.50 | - / 70.00 |" in md
    assert "| em | 100.0 ± 0.0 (2) | - |" in md  # train accuracy: no paper number
    paths = render(grid)
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].endswith(",paper_test_acc") and len(lines) == 1 + 4
    assert lines[2].startswith("clean,2,0,") and lines[2].endswith(",0.8025")
    assert paths["picture"].stat().st_size > 0


@pytest.mark.parametrize("paper, match", [
    ({**PAPER_BLOCK, "table": 9}, "expected a mapping with the keys"),
    ({**PAPER_BLOCK, "rows": ["radius"]}, "rows must be"),
    ({**PAPER_BLOCK, "columns": {"source": ["clean"], "seed": [0]}}, "columns must be one axis"),
    ({**PAPER_BLOCK, "values": [[0, 90.0]]}, "row value"),
    ({**PAPER_BLOCK, "values": [[0, 90.0, "ten"]]}, "not a number"),
    ({**PAPER_BLOCK, "values": [[4, 90.0, 10.0]]}, "adv_radius 4 is not one of the grid's"),
    ({**PAPER_BLOCK, "values": [[0, 90.0, 10.0], [0.0, 91.0, 11.0]]}, "more than one number"),
    ({**PAPER_BLOCK, "rows": ["adv_radius", "protected_fraction"], "values": [[0, 1.0, 90.0, 10.0]]},
     "no cell of the grid has"),  # clean cells have no protected fraction
])
def test_paper_block_is_checked(tmp_path, paper, match):
    with pytest.raises(ValueError, match=match):
        load_grid(_paper_grid(tmp_path, paper))
