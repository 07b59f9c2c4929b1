"""The ``difflora`` command: argument errors exit 2, input errors exit 1, both with a message."""

import json

import pytest

from difflora_jax.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "hi"], "--model"),
        (["generate", "--model", "m"], "--prompt"),
        (
            ["generate", "--model", "m", "--prompt", "hi", "--max-new-tokens", "0"],
            "positive integer",
        ),
        (
            ["generate", "--model", "m", "--prompt", "hi", "--max-new-tokens", "x"],
            "positive integer",
        ),
        (["generate", "--model", "m", "--prompt", "hi", "--temperature", "-1"], ">= 0"),
        (["generate", "--model", "m", "--prompt", "hi", "--top-p", "0"], "(0, 1]"),
        (["generate", "--model", "m", "--prompt", "hi", "--dtype", "float16"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "difflora: error: " in err  # one form for argument and input errors (README)


@pytest.mark.parametrize(
    "model, message",
    [
        ("no-such-alias", "unknown model 'no-such-alias'"),
        ("/nonexistent/dir/model.gguf", "does not exist"),
    ],
)
def test_bad_model_exits_1_with_a_message(model, message, capsys):
    assert main(["generate", "--model", model, "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("difflora: error:") and message in err


def test_generate_chat_answers_paris(capsys):
    code = main(
        [
            "generate",
            "--model",
            "smollm2-135m-instruct",
            "--chat",
            "--max-new-tokens",
            "16",
            "--json",
            "--prompt",
            "What is the capital of France? Answer in one word.",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Paris" in record["text"]
    assert record["finish_reason"] in ("eos", "length")
