"""The quickstart's side-by-side training: a failure in one worker process stops the run and names its log."""
import pytest

from mixret import quickstart
from mixret.errors import MixretError
from mixret.quickstart import QuickstartConfig, train_all


def test_a_failing_architecture_stops_the_run_and_names_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(quickstart, "side_by_side_threads", lambda: 1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl.gz").write_bytes(b"not gzip")            # every worker fails to read its pairs
    said = []
    with pytest.raises(MixretError, match=r"training (masked-mixer|llama) failed \(its log: .*\.log\): .*train"):
        train_all(QuickstartConfig(out=str(tmp_path), budget_minutes=0.1), data, tmp_path, said.append)
    assert "side by side" in said[1]
    assert (tmp_path / "logs" / "masked-mixer.log").is_file()
