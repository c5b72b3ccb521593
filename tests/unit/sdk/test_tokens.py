"""`protege token new` and `protege token hash`: tokens files that servers load and that hold no
usable token."""

from __future__ import annotations

import stat

import pytest
import yaml
from protege import errors, serving
from protege.cli import app
from typer.testing import CliRunner


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _auth(lines: str, tmp_path) -> serving.TokenAuth:
    path = tmp_path / "tokens.yaml"
    path.write_text(lines)
    return serving.TokenAuth.from_env(str(path))


def test_new_writes_a_private_token_and_prints_its_tokens_file_line(runner, tmp_path):
    out = tmp_path / "learner-generator.token"
    result = runner.invoke(app, ["token", "new", "--scope", "generate", "--scope", "weights",
                                 "--token-out", str(out)])
    assert result.exit_code == 0, result.output
    token = out.read_text().strip()
    assert len(token) >= 40 and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert token not in result.stdout
    [(hashed, scopes)] = yaml.safe_load(result.stdout).items()
    assert hashed.startswith("sha256$") and scopes == ["generate", "weights"]
    auth = _auth(result.stdout, tmp_path)
    auth.check("/protege.v1.Generator/LoadWeights", [("authorization", f"Bearer {token}")])
    with pytest.raises(errors.PermissionDenied, match="needs scope 'jobs'"):
        auth.check("/protege.v1.Jobs/SubmitJob", [("authorization", f"Bearer {token}")])
    again = runner.invoke(app, ["token", "new", "--scope", "jobs", "--token-out", str(out)])
    assert again.exit_code == 1 and "never overwritten" in again.output
    assert out.read_text().strip() == token


def test_hash_reads_the_token_from_stdin_or_a_file(runner, tmp_path):
    token = "a-long-random-token-0123456789abcdef"
    (tmp_path / "t").write_text(token + "\n")
    from_stdin = runner.invoke(app, ["token", "hash", "--scope", "reward"], input=token + "\n")
    from_file = runner.invoke(app, ["token", "hash", "--scope", "reward", "--token-file",
                                    str(tmp_path / "t")])
    for result in (from_stdin, from_file):
        assert result.exit_code == 0, result.output
        assert token not in result.stdout and "warning" not in result.output
        _auth(result.stdout, tmp_path).check("/protege.v1.Reward/Score",
                                             [("authorization", f"Bearer {token}")])


@pytest.mark.parametrize("args, stdin, message", [
    (["--scope", "superuser"], "x" * 30, "unknown scope(s) ['superuser']"),
    ([], "x" * 30, "give the token's scopes with --scope"),
    (["--scope", "jobs"], "\n", "must be non-empty"),
])
def test_hash_refuses_bad_input_saying_what_to_do(runner, args, stdin, message):
    result = runner.invoke(app, ["token", "hash", *args], input=stdin)
    assert result.exit_code == 1 and message in result.output, result.output


def test_hash_warns_about_a_short_token(runner):
    result = runner.invoke(app, ["token", "hash", "--scope", "jobs"], input="s3cret\n")
    assert result.exit_code == 0 and "warning: the token has 6 characters" in result.output
