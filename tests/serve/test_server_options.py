"""The server's command line: loopback by default, no exposure without an API key."""
import pytest

from mindone_ext.serve.__main__ import parse_args


def test_binds_to_loopback_by_default_and_needs_a_key_elsewhere(capsys, monkeypatch):
    monkeypatch.delenv("MINDONE_API_KEY", raising=False)
    args = parse_args(["--model_path", "m"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    assert parse_args(["--model_path", "m", "--host", "::1"]).api_key is None
    with pytest.raises(SystemExit):
        parse_args(["--model_path", "m", "--host", "0.0.0.0"])
    assert "exposes the service" in capsys.readouterr().err
    assert parse_args(["--model_path", "m", "--host", "0.0.0.0", "--api_key", "k"]).api_key == "k"
    monkeypatch.setenv("MINDONE_API_KEY", "from-env")
    assert parse_args(["--model_path", "m", "--host", "0.0.0.0"]).api_key == "from-env"
