"""train.report_to (common/trackers.py): a run logged to MLflow's local file store and to W&B in offline mode, read
back as a user would; the answers to the evaluation prompts go only where the recipe sends them."""
import json
from pathlib import Path

import pytest

from tests.test_train import run, write_recipe


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file: a LevelDB-style log (32 KiB blocks, a 7-byte header per
    chunk: crc, length, type 1 full / 2 first / 3 middle / 4 last) after a 7-byte W&B header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_unknown_and_missing_trackers_are_one_line_each(tmp_path, tiny_model_dir, data_file):
    from common import trackers

    assert trackers.problems(["tensorbord"]) == [
        "`train.report_to`: unknown tracker `tensorbord` (did you mean `tensorboard`?) "
        "(one of: tensorboard, wandb, mlflow, swanlab, trackio, none)"]
    assert trackers.integrations("tensorboard") == ["none"] and trackers.names("none") == []
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, train={"report_to": ["mlflow", "tensorbord"]})
    assert run(recipe) == 2


def test_a_run_logged_to_mlflow_and_wandb_offline_reads_back(tmp_path, tiny_model_dir, data_file, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.18 asks for the opt-in (a database is its default)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "counselling")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "counselling")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, name="tracked",
                          train={"report_to": ["tensorboard", "mlflow", "wandb"], "max_steps": 2, "save_steps": 2,
                                 "report_answers": True})
    assert run(recipe) == 0
    import wandb

    wandb.finish()  # the offline run's files are complete once it is finished (as at the end of a script)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    [found] = client.search_runs([client.get_experiment_by_name("counselling").experiment_id])
    assert found.data.params["recipe/data/template"] == "qwen_chat"
    assert found.data.params["precision/dtype"] == "float32"
    assert found.data.metrics["dataset/records"] == 8 and "loss" in found.data.metrics
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"recipe.json", "dataset_stats.json", "evaluation_answers"} <= artifacts
    [offline] = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # what `wandb sync` would upload
    records = wandb_records(offline)
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert config["recipe"]["data"]["template"] == "qwen_chat"
    assert config["dataset"]["records"] == 8 and config["precision"]["dtype"] == "float32"
    logged = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
              for item in r.history.item}
    assert "train/loss" in logged and any(key.startswith("evaluation/answers") for key in logged)
    assert list((tmp_path / "tracked" / "runs").iterdir())  # TensorBoard too


def test_answers_stay_in_the_run_directory_by_default(tmp_path, tiny_model_dir, data_file, monkeypatch):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.18 asks for the opt-in (a database is its default)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "quiet")
    recipe = write_recipe(tmp_path, tiny_model_dir, data_file, name="quiet",
                          train={"report_to": "mlflow", "max_steps": 1, "save_steps": 1})
    assert run(recipe) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    [found] = client.search_runs([client.get_experiment_by_name("quiet").experiment_id])
    assert "evaluation_answers" not in {a.path for a in client.list_artifacts(found.info.run_id)}
    assert list((tmp_path / "quiet" / "eval_outputs").iterdir())  # written where they always are
    assert not (tmp_path / "quiet" / "runs").exists()  # tensorboard was not asked for
