"""YAML past musicvae's limits (an alias bomb, a self-referencing alias, nesting too deep) is refused
before anything is built: as a `--config` file of `fit` and of the other commands, and as the run
config stored in a checkpoint. One line, exit status 2, and the process's memory does not grow.

The bomb here expands to 2 x 9^6 = 1.06 million nodes (each level defined, the last used once more), past the 100000 limit yet small enough that, without
the limit, the commands would merely spend seconds and a few hundred MB on it instead of the
2.8 GB of a full billion-laughs file.
"""

from __future__ import annotations

import resource

import pytest
import torch
import yaml

from conftest import load_script
from musicvae.errors import OversizedYAMLError
from musicvae.io.safe_load import MAX_YAML_DEPTH, MAX_YAML_NODES, check_yaml_size, safe_yaml_load

#: The peak RSS a refused file may add to the test process (the limit keeps it at ~0).
MAX_GROWTH_KB = 100_000


def alias_bomb(levels: int = 6, width: int = 9, key: str = "data") -> str:
    """A "billion laughs" YAML: `width ** levels` scalars under `key` from a few hundred bytes."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    lines.append(f"{key}: {{data_dir: *l{levels - 1}}}")
    return "\n".join(lines) + "\n"


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_limits_count_aliases_as_what_they_stand_for():
    check_yaml_size(alias_bomb(levels=5, width=8), "small")  # 2 x 8^5 = 65536 nodes and the anchors: under the limit
    with pytest.raises(OversizedYAMLError, match=rf"big: refused: it expands past {MAX_YAML_NODES} YAML nodes"):
        check_yaml_size(alias_bomb(levels=6), "big")
    with pytest.raises(OversizedYAMLError, match=r"the alias \*a refers to a collection that contains it"):
        safe_yaml_load("a: &a {b: *a}", "loop")
    deep = "[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1)
    with pytest.raises(OversizedYAMLError, match=rf"nested deeper than {MAX_YAML_DEPTH} levels"):
        safe_yaml_load(deep, "deep")
    text = "a: &x [1, 2]\nb: *x\nc: {d: 3.5, e: null}\n"
    assert safe_yaml_load(text, "fine") == yaml.safe_load(text)
    with pytest.raises(yaml.YAMLError):  # syntax errors stay the loader's, with their position
        safe_yaml_load("a: [1, 2", "broken")


@pytest.mark.parametrize("command", ["fit", "generate", "evaluate"])
def test_an_alias_bomb_as_config_is_one_line_and_exit_2(command, tmp_path, capsys):
    from musicvae.training.cli import subcommand_main

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    before = peak_rss_kb()
    if command == "fit":
        status = subcommand_main(["fit", "--config", str(bomb)], program="musicvae")
    elif command == "generate":
        with pytest.raises(SystemExit) as stopped:  # a parse error exits from the parser, as argparse's do
            load_script("generate").main(["--config", str(bomb), "sample", "--ckpt_path", "x", "--out", str(tmp_path)])
        status = stopped.value.code
    else:
        with pytest.raises(SystemExit) as stopped:
            load_script("evaluate").main(["--config", str(bomb), "--ckpt_path", "x", "--out", str(tmp_path / "r")])
        status = stopped.value.code
    err = capsys.readouterr().err
    assert status == 2
    [line] = err.strip().splitlines()
    # jsonargparse tells its loader the file's name only (os.path.basename)
    assert line.startswith("musicvae") and f"{bomb.name}: refused: it expands past {MAX_YAML_NODES} YAML nodes" in line
    assert peak_rss_kb() - before < MAX_GROWTH_KB


def test_a_checkpoint_whose_stored_config_is_an_alias_bomb_is_refused(tiny_run, tmp_path, capsys):
    from musicvae.training.checkpoints import RUN_CONFIG_KEY
    from musicvae.training.cli import subcommand_main

    ckpt = torch.load(tiny_run["ckpt_dir"] / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt[RUN_CONFIG_KEY] = alias_bomb(key="model")
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)
    before = peak_rss_kb()
    status = subcommand_main(["fit", "--ckpt_path", str(crafted), "--checkpoint_dir", str(tmp_path / "ckpt")],
                             program="musicvae")
    [line] = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and line.startswith("musicvae: error: the run config stored in the checkpoint: refused"), line
    # evaluate reads the stored config too (the data settings of the run's validation split).
    assert load_script("evaluate").main(["--ckpt_path", str(crafted), "--out", str(tmp_path / "report")]) == 2
    assert "refused: it expands past" in capsys.readouterr().err
    assert peak_rss_kb() - before < MAX_GROWTH_KB
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "report").exists()
