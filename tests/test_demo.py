"""demo.py without network: one message that says how to run it on local data."""
import sys

import pytest

import demo


def test_demo_without_network_names_data_dir(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):  # what hf_hub_download raises once its retries give up
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.\nPlease check your connection.")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--data-dir", "", "--work-dir", str(tmp_path / "work"),
                                      "--out-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        demo.main()
    message = str(stop.value.code)
    assert "DATA_DIR=path/to/data" in message and "shibing624/medical" in message
    assert "LocalEntryNotFoundError: An error happened" in message and "Please check" not in message  # one line of it
    assert len(message.splitlines()) == 2
