"""A checkpoint's stored config is data: crafted checkpoints import nothing, call nothing, and write or
delete nothing outside the places the user's command (or a documented default) names.

Each crafted checkpoint is a real one (the session's tiny run) whose stored config, callback state or
hyper-parameters were edited as an attacker would. A module on `sys.path` that writes a marker file
when imported stands for any code a class path could name. Runs go through `subcommand_main`, the
command's own entry point, in-process.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from musicvae.training.checkpoints import RUN_CONFIG_KEY, RUN_ID_KEY
from musicvae.training.cli import subcommand_main

EVIL = "musicvae_test_evil_module"


@pytest.fixture
def evil(tmp_path, monkeypatch) -> Path:
    """An importable module whose import writes `marker`; its attributes are callables and classes."""
    folder, marker = tmp_path / "evil_path", tmp_path / "IMPORTED"
    folder.mkdir()
    (folder / f"{EVIL}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from lightning.pytorch.callbacks import Callback\n"
        "class Foo(Callback):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, EVIL, raising=False)
    return marker


def craft(source: Path, target: Path, config=None, state=None, ckpt=None) -> Path:
    """A copy of checkpoint `source` at `target`, its stored config, callback state or whole dict edited."""
    data = torch.load(source, map_location="cpu", weights_only=True)
    stored = yaml.safe_load(data[RUN_CONFIG_KEY])
    if config:
        config(stored)
    data[RUN_CONFIG_KEY] = yaml.safe_dump(stored, sort_keys=False)
    for key in data["callbacks"]:
        if key.startswith("FixedNameCheckpoint") and state:
            state(data["callbacks"][key])
    if ckpt:
        ckpt(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, target)
    return target


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by relative path, with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(args: list[str], capfd) -> tuple[int, str]:
    code = subcommand_main(args, program="musicvae")
    captured = capfd.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def victim(tiny_run, tmp_path) -> Path:
    """Another run's folder (a copy of the session's tiny run: checkpoints, logs), which must stay untouched."""
    folder = tmp_path / "victim"
    shutil.copytree(tiny_run["ckpt_dir"], folder / "ckpt")
    shutil.copytree(tiny_run["root"] / "logs", folder / "logs")
    (folder / "victim.txt").write_text("keep me")
    return folder


def set_callbacks(entries):
    return lambda stored: stored["trainer"].__setitem__("callbacks", entries)


REFUSED_CLASSES = {
    "unknown module": set_callbacks([{"class_path": f"{EVIL}.Foo"}]),
    "LambdaCallback": set_callbacks([{"class_path": "lightning.pytorch.callbacks.LambdaCallback",
                                      "init_args": {"on_fit_start": "builtins.print",
                                                    "on_predict_start": f"{EVIL}.Foo"}}]),
    "ModelCheckpoint elsewhere": set_callbacks([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                 "init_args": {"dirpath": "/tmp/elsewhere"}}]),
    "logger class": lambda stored: stored["trainer"].__setitem__("logger", {"class_path": f"{EVIL}.Foo"}),
    "class in model": lambda stored: stored["model"]["init_args"].__setitem__("channels", {"class_path": f"{EVIL}.Foo"}),
    "model class": lambda stored: stored["model"].__setitem__("class_path", f"{EVIL}.Foo"),
    "old-layout model class": lambda stored: stored.__setitem__("model", {"_class_path": f"{EVIL}.Foo", "lr": 0.1}),
    "nested class": set_callbacks([{"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                                    "init_args": {"monitor": {"class_path": f"{EVIL}.Foo"}}}]),
}


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
@pytest.mark.parametrize("case", list(REFUSED_CLASSES))
def test_a_stored_class_outside_the_allowlist_is_refused_before_any_import(tiny_run, tmp_path, evil, capfd,
                                                                            monkeypatch, subcommand, case):
    monkeypatch.chdir(tmp_path)
    crafted = craft(tiny_run["ckpt_dir"] / "last.ckpt", tmp_path / "handed" / "last.ckpt", REFUSED_CLASSES[case])
    code, err = run([subcommand, "--ckpt_path", str(crafted)], capfd)
    lines = [line for line in err.splitlines() if line.startswith("musicvae: error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert str(crafted) in lines[0] and "does not take from a checkpoint" in lines[0] and "give it yourself" in lines[0]
    assert not evil.exists() and EVIL not in sys.modules
    # Nothing was written: no checkpoint, log, prediction or cache folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil_path", "handed"]


def test_the_refusal_names_the_flag_that_passes_the_class_explicitly(tiny_run, tmp_path, evil, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    crafted = craft(tiny_run["ckpt_dir"] / "last.ckpt", tmp_path / "handed" / "last.ckpt",
                    REFUSED_CLASSES["LambdaCallback"])
    code, err = run(["fit", "--ckpt_path", str(crafted)], capfd)
    assert code == 2
    assert "trainer.callbacks[0]" in err and "--trainer.callbacks+=lightning.pytorch.callbacks.LambdaCallback" in err


def hostile_places(victim: Path, copy: Path):
    """A stored config and callback state that name the victim's folders as places to write and delete."""

    def config(stored):
        stored["checkpoint_dir"] = str(victim / "ckpt")
        stored["predict_dir"] = str(victim / "predictions")
        stored["data"]["cache_dir"] = str(victim / "cache")
        stored["trainer"]["default_root_dir"] = str(victim)
        stored["trainer"]["logger"]["init_args"].update(save_dir=str(victim / "logs"), version=0, sub_dir="../..")
        stored["trainer"]["plugins"] = [{"class_path": f"{EVIL}.Foo"}]
        stored["trainer"]["profiler"] = {"class_path": f"{EVIL}.Foo"}
        stored["trainer"]["strategy"] = {"class_path": f"{EVIL}.Foo"}
        stored["weights_only"] = False

    def state(callback):
        # Lightning would restore these as given (dirpath is the copy's own folder), then delete the old
        # "kth best" file when the resumed run saves a better model.
        callback["dirpath"] = str(copy)
        escape = f"{copy}/../../victim/victim.txt"
        callback["kth_best_model_path"] = callback["best_model_path"] = escape
        callback["best_k_models"] = {escape: torch.tensor(1e9)}
        callback["best_model_score"] = torch.tensor(1e9)

    return config, state


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["honest copy", "crafted"])
def test_a_resume_writes_and_deletes_only_beside_itself(tiny_run, victim, tmp_path, evil, capfd, caplog, monkeypatch,
                                                       kind):
    """A checkpoint copied into a new folder (honestly, or crafted to name another run's folders) resumes
    there: the other run's files stay byte-identical, nothing is imported, nothing outside is deleted."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MUSICVAE_CACHE", str(tmp_path / "default_cache"))
    copy = tmp_path / "handed"
    if kind == "honest copy":
        copy.mkdir()
        crafted = Path(shutil.copy(victim / "ckpt" / "last.ckpt", copy / "last.ckpt"))
    else:
        config, state = hostile_places(victim, copy)
        crafted = craft(victim / "ckpt" / "last.ckpt", copy / "last.ckpt", config, state)
    before = fingerprint(victim)
    code, err = run(["fit", "--ckpt_path", str(crafted), "--trainer.max_epochs", "3"], capfd)
    assert code == 0, err[-3000:]
    assert fingerprint(victim) == before
    assert not evil.exists()
    resumed = torch.load(copy / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2  # the resume ran, beside the checkpoint it resumed
    assert resumed[RUN_ID_KEY] == torch.load(victim / "ckpt" / "last.ckpt", weights_only=True)[RUN_ID_KEY]
    assert (work / "logs" / "musicvae").is_dir()  # the documented default, not the stored folder
    if kind == "crafted":
        assert "not taken from the checkpoint" in caplog.text and "predict_dir" in caplog.text


@pytest.mark.slow
def test_predict_and_evaluate_write_where_the_user_says_not_where_the_checkpoint_says(tiny_run, victim, tmp_path,
                                                                                     capfd, monkeypatch):
    from conftest import load_script

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MUSICVAE_CACHE", str(tmp_path / "default_cache"))
    config, _ = hostile_places(victim, tmp_path / "handed")
    crafted = craft(victim / "ckpt" / "last.ckpt", tmp_path / "handed" / "last.ckpt",
                    lambda stored: (config(stored), stored["trainer"].update(plugins=None, profiler=None, strategy="auto")))
    before = fingerprint(victim)
    code, err = run(["predict", "--ckpt_path", str(crafted)], capfd)
    assert code == 0, err[-3000:]
    assert list((work / "predictions").rglob("*.pt"))  # predict's documented default
    code = load_script("evaluate").main(["--ckpt_path", str(crafted), "--out", str(work / "report")])
    assert code in (0, None), capfd.readouterr().err[-3000:]
    assert (work / "report").is_dir() and (tmp_path / "default_cache").is_dir()
    assert fingerprint(victim) == before


def test_resuming_into_another_runs_folder_is_refused(tiny_run, victim, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = craft(tiny_run["ckpt_dir"] / "last.ckpt", tmp_path / "other" / "last.ckpt",
                  ckpt=lambda data: data.__setitem__(RUN_ID_KEY, "another-run"))
    before = fingerprint(victim)
    code, err = run(["fit", "--ckpt_path", str(other), "--checkpoint_dir", str(victim / "ckpt")], capfd)
    assert code == 2 and "of another run than" in err and "--overwrite true" in err, err[-2000:]
    assert fingerprint(victim) == before


def test_checkpoints_without_a_run_id_resume_only_into_their_own_folder(tiny_run, victim, tmp_path, capfd,
                                                                       monkeypatch):
    """Written before runs had ids: the folder holding the file is its run's; any other used folder is not."""
    from musicvae.training.checkpoints import foreign_checkpoints

    strip = lambda data: data.pop(RUN_ID_KEY, None)  # noqa: E731
    old = craft(victim / "ckpt" / "last.ckpt", tmp_path / "old" / "last.ckpt", ckpt=strip)
    craft(victim / "ckpt" / "best.ckpt", tmp_path / "old" / "best.ckpt", ckpt=strip)
    ckpt = torch.load(old, weights_only=True)
    assert foreign_checkpoints(tmp_path / "old", ckpt, old) == []
    assert foreign_checkpoints(victim / "ckpt", ckpt, old) == ["best.ckpt", "last.ckpt"]
    monkeypatch.chdir(tmp_path)
    code, err = run(["fit", "--ckpt_path", str(old), "--checkpoint_dir", str(victim / "ckpt")], capfd)
    assert code == 2 and "of another run than" in err


@pytest.mark.parametrize("field,value", [("channels", [2**20, 2**20]), ("latent_dim", 2**31)])
def test_crafted_sizes_are_refused_before_any_allocation(tiny_run, tmp_path, capfd, monkeypatch, field, value):
    """A model of terabytes described by hyper-parameters is refused from its meta-device shapes."""
    from conftest import load_script

    monkeypatch.chdir(tmp_path)

    def edit(data):
        data["hyper_parameters"][field] = value
        stored = yaml.safe_load(data[RUN_CONFIG_KEY])
        stored["model"]["init_args"][field] = value
        data[RUN_CONFIG_KEY] = yaml.safe_dump(stored)

    crafted = craft(tiny_run["ckpt_dir"] / "last.ckpt", tmp_path / "handed" / "last.ckpt", ckpt=edit)
    code, err = run(["fit", "--ckpt_path", str(crafted)], capfd)
    assert code == 2 and str(crafted) in err and re.search("more than musicvae builds|do not fit|do not describe", err), err[-2000:]
    code = load_script("export").main(["--ckpt_path", str(crafted), "--out", str(tmp_path / "m.pt")])
    err = capfd.readouterr().err
    assert code == 2 and re.search("more than musicvae builds|do not fit|do not describe", err), err[-2000:]


def test_crafted_mel_settings_are_refused(tiny_run, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def edit(data):
        data["MelDataModule"]["mel"]["n_fft"] = 2**30

    crafted = craft(tiny_run["ckpt_dir"] / "last.ckpt", tmp_path / "handed" / "last.ckpt", ckpt=edit)
    code, err = run(["validate", "--ckpt_path", str(crafted)], capfd)
    assert code == 2 and "n_fft" in err and "refused before building" in err, err[-2000:]


def test_the_checkpoint_callback_maps_stored_paths_into_its_own_folder(tmp_path):
    """Unit: every stored path is this callback's own file in the current folder, or nothing."""
    from musicvae.training.callbacks import FixedNameCheckpoint

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "best.ckpt").write_bytes(b"x")
    callback = FixedNameCheckpoint(dirpath=str(folder), filename="best", monitor="val/loss", save_top_k=1)
    escape = f"{folder}/../../victim.txt"
    callback.load_state_dict({
        "dirpath": str(folder), "best_model_path": "s3://bucket/elsewhere/best.ckpt",
        "best_model_score": torch.tensor(0.5), "kth_best_model_path": escape, "kth_value": torch.tensor(0.5),
        "best_k_models": {escape: torch.tensor(0.5), "/else/best.ckpt": "not a number"}, "last_model_path": escape,
    })
    assert callback.best_model_path == str(folder / "best.ckpt")
    assert float(callback.best_model_score) == 0.5
    assert callback.kth_best_model_path == "" and callback.last_model_path == ""
    assert callback.best_k_models == {}


def test_config_as_data_keeps_plain_settings_and_allowlisted_classes(tmp_path):
    from musicvae.training.stored_config import config_as_data

    stored = {
        "seed_everything": 3, "checkpoint_dir": "/elsewhere", "predict_dir": "/elsewhere/p",
        "trainer": {"max_epochs": 5, "strategy": "ddp", "default_root_dir": "/elsewhere",
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                                   "init_args": {"monitor": "val/loss", "patience": 2}}],
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "/elsewhere", "name": "../up", "version": 3}}},
        "model": {"lr": 0.1, "media_vocoder": "/voc"},  # the earlier layout: read as media.vocoder
        "data": {"data_dir": "/music", "cache_dir": "/elsewhere/cache"},
    }
    taken = config_as_data(stored, tmp_path / "run" / "last.ckpt", "fit")
    assert taken.config["checkpoint_dir"] == str((tmp_path / "run").resolve())
    assert "predict_dir" not in taken.config and "cache_dir" not in taken.config["data"]
    assert taken.config["trainer"] == {
        "max_epochs": 5,
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                       "init_args": {"monitor": "val/loss", "patience": 2}}],
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {}},
    }
    assert taken.inputs == ["data.data_dir /music", "media.vocoder /voc"]
    assert dict(taken.not_taken)["trainer.strategy"] == "ddp"
    # A list the user's own command sets is not read, so its stored entries are not checked either.
    crafted = {"trainer": {"callbacks": [{"class_path": "os.system"}]}}
    assert "callbacks" not in config_as_data(crafted, tmp_path / "x.ckpt", "fit", {"trainer.callbacks"}).config["trainer"]


def test_a_stored_log_folder_is_continued_only_where_the_command_names_it(tmp_path):
    """Unit: the stored version is taken when this run's folder is the stored one; otherwise it is named."""
    from jsonargparse import Namespace

    from musicvae.training.resume import repin_loggers

    stored = [{"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": str(tmp_path / "logs"), "name": "run", "version": 3}}]
    same = Namespace(class_path=stored[0]["class_path"],
                     init_args=Namespace(save_dir=str(tmp_path / "logs"), name="run", version=None))
    assert repin_loggers(same, stored) == [] and same.init_args.version == 3
    other = Namespace(class_path=stored[0]["class_path"], init_args=Namespace(save_dir="logs", name="run", version=None))
    assert repin_loggers(other, stored) == [f"{tmp_path / 'logs'}/run"] and other.init_args.version is None
    crafted = [{**stored[0], "init_args": {**stored[0]["init_args"], "version": "../../elsewhere"}}]
    same.init_args.version = None
    repin_loggers(same, crafted)
    assert same.init_args.version is None  # a version that is a path is never taken
