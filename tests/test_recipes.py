"""The shipped compression recipes load, validate, and pair their student with the teacher they name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

RECIPES = PROJECT_ROOT / "recipes"
#: The teacher each recipe is written for (arch, kwargs), as its header comment says.
TEACHERS = {
    "cifar-r18-to-r18x025-ort-cpu.yaml": ("resnet18_cifar", {}),
    "cifar-r18-to-mobilenetv3-ort-cpu.yaml": ("resnet18_cifar", {}),
    "dino-vits16-to-orin-nano-fp16.yaml": ("vit_small", {}),
    "dino-r50-to-orin-nano-int8.yaml": ("resnet50", {}),
}


def _recipes() -> list[Path]:
    return sorted(RECIPES.glob("*.yaml"))


def test_every_recipe_is_listed_with_its_teacher():
    assert {p.name for p in _recipes()} == set(TEACHERS)


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    from edge_ssl.compress.recipe import load_recipe

    recipe = load_recipe(path)
    assert recipe.student is not None and recipe.quantize in ("int8", "fp16")
    assert recipe.distill_config().student == recipe.student


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.name)
def test_recipe_student_pairs_with_its_teacher(path):
    """Teacher and student must read the same image size; the student must be smaller."""
    import torch
    from edge_ssl.compress.distill import check_pairing
    from edge_ssl.compress.recipe import load_recipe

    from edge_ssl.models import count_parameters, create_encoder

    recipe = load_recipe(path)
    arch, kwargs = TEACHERS[path.name]
    with torch.device("meta"):
        teacher = create_encoder(arch, **kwargs)
        student = create_encoder(recipe.student, **recipe.student_kwargs)
    check_pairing(teacher.spec, student.spec)
    assert count_parameters(student) < count_parameters(teacher)


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.name)
def test_recipe_says_how_to_run_it(path):
    text = path.read_text(encoding="utf-8")
    assert re.search(rf"--recipe recipes/{re.escape(path.name)}", text), "header must show the command"


def test_cli_flags_override_a_recipe():
    from edge_ssl.compress.recipe import load_recipe

    path = RECIPES / "cifar-r18-to-r18x025-ort-cpu.yaml"
    recipe = load_recipe(path, {"prune": 0.5, "max_knn_drop": None})
    assert recipe.prune == 0.5 and recipe.max_knn_drop == 3.0


def test_a_misspelt_key_is_rejected_with_a_hint(tmp_path):
    from edge_ssl.compress.recipe import load_recipe

    from edge_ssl.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("student: resnet18_cifar\nprunee: 0.3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="prune"):
        load_recipe(bad)
