"""README.md's shell commands keep working (issue 20): every command is classified (tests/readme_commands.py), every
Hydra command's overrides compose, and (slow) the runnable ones run in order at tiny size and write what they claim."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import ROOT
from tests.readme_commands import COMMANDS, MODULES, Run, Skip, classify, hydra_overrides, readme_commands
from unclip.config import conf_dir, register_resolvers


def test_every_readme_command_is_classified():
    result = classify(readme_commands())
    assert not result.missing, f"README commands with no entry in tests/readme_commands.py COMMANDS: {result.missing}"
    assert not result.stale, f"COMMANDS entries no longer in README.md: {result.stale}"
    for command, action in COMMANDS.items():
        assert isinstance(action, Run) or action.reason, command


def test_the_parser_joins_continuations_and_drops_comments():
    text = "x\n```bash\n# a comment\nunclip-eval a=1 \\\n    b='#x' # why\n\nwandb sync runs/p\n```\n"
    assert readme_commands(text) == ["unclip-eval a=1 b='#x'", "wandb sync runs/p"]


def test_a_new_readme_command_is_caught():
    commands = [*readme_commands(), "unclip-train experiment=something_new"]
    assert classify(commands).missing == ["unclip-train experiment=something_new"]


HYDRA_COMMANDS = [c for c in readme_commands() if hydra_overrides(c) is not None
                  and not (isinstance(COMMANDS.get(c), Skip) and not COMMANDS[c].compose)]


@pytest.mark.parametrize("command", HYDRA_COMMANDS)
def test_readme_overrides_compose(command):
    """The README's own overrides (placeholders replaced) compose through Hydra: a renamed key, group or preset
    fails here in seconds. Nothing is resolved or trained."""
    action = COMMANDS[command]
    assert _compose(command) is not None
    if isinstance(action, Run):  # ... and as the slow test runs it (stand-ins, tiny sizes)
        assert _compose(action.command(command)) is not None


def _compose(command: str):
    _, config, overrides = hydra_overrides(command)
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


# ---- the slow test: run them ---------------------------------------------------------------------------------------

def _photos(root: Path) -> None:
    """40 coloured-square photos with same-stem captions (the README's ``photos/`` folder and its table)."""
    from PIL import Image

    (root / "photos").mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
    rows = []
    for i in range(40):
        name, rgb = list(colours.items())[i % 4]
        image = Image.new("RGB", (80 + i, 72), (250, 250, 250))
        image.paste(Image.new("RGB", (30, 30), rgb), (10 + i % 20, 20))
        image.save(root / "photos" / f"{i:03d}.png")
        (root / "photos" / f"{i:03d}.txt").write_text(f"a {name} square number {i}")
        rows.append({"path": str(root / "photos" / f"{i:03d}.png"), "caption": f"a {name} square number {i}"})
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), root / "captions.parquet")


def _photo(root: Path) -> None:
    shutil.copy(root / "photos" / "000.png", root / "photo.png")


def _inception(root: Path) -> None:
    """Random weights with the real network's keys (no download): both names the README commands use."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        state = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    for name in ("inception.pth", "pt_inception-2015-12-05.pth"):
        torch.save(state, root / name)


SETUPS = {"photos": _photos, "parquet": lambda root: None, "photo": _photo, "inception": _inception}


def shell_command(command: str) -> str:
    """The command with each program run from this checkout (``python -m``), as its console script would."""
    words = command.split(" ", 1)
    if words[0] in MODULES:
        return f"{shlex.quote(sys.executable)} -m {MODULES[words[0]]} {words[1] if len(words) > 1 else ''}"
    return command.replace("python scripts/", f"{shlex.quote(sys.executable)} {ROOT}/scripts/", 1)


@pytest.mark.slow
def test_readme_commands_run(tmp_path, emoji_root):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "UNCLIP_EMOJI_ROOT": str(emoji_root),
           "WANDB_MODE": "disabled", "UNCLIP_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "1"}
    done = set()
    for readme, action in COMMANDS.items():
        if not isinstance(action, Run):
            continue
        if action.setup and action.setup not in done:
            SETUPS[action.setup](tmp_path)
            done.add(action.setup)
        command = shell_command(action.command(readme))
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{readme}\n  ran as: {command}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
        for path in action.creates:
            assert (tmp_path / path).exists(), f"{readme}: no {path}\n{result.stderr[-2000:]}"
