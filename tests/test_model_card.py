"""The exported pipeline's model card."""

from fewstep.export.model_card import model_card
from fewstep.tools.export import run_eval_table


def test_card_has_the_call_per_step_count_the_teacher_and_the_scores():
    record = {
        "kind": "student",
        "method": "LADD",
        "process": {"class": "RectifiedFlow"},
        "prediction": "velocity",
        "sampler": "Euler(steps=4)",
        "pipeline_call": {"num_inference_steps": 4, "guidance_scale": 1.0},
        "pipeline_calls": {"1": {"sigmas": [1.0]}, "4": {"num_inference_steps": 4}},
        "teacher": {"ckpt": "t.ckpt", "config": "t.yaml", "sha256": "abc123"},
    }
    card = model_card(record, "| model | GenEval |\n|---|---|\n| student_4 | 0.70 |")
    assert card.startswith("---\nlibrary_name: diffusers")
    assert '"num_inference_steps": 4' in card and '| 1 | `{"sigmas": [1.0]}` |' in card
    assert "sha256 `abc123`" in card and "| student_4 | 0.70 |" in card
    assert "prompt_embeds" in card  # no text encoder recorded


def test_the_newest_eval_table_of_the_checkpoints_run_is_found(tmp_path):
    run_dir = tmp_path / "student_ladd"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "eval_table.md").write_text("table")
    assert run_eval_table(run_dir / "checkpoints" / "last.ckpt") == "table"
    assert run_eval_table(tmp_path / "elsewhere" / "checkpoints" / "x.ckpt") is None
