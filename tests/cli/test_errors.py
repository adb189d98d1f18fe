"""A misconfigured ``albef-ds`` command prints one line naming the key or file and exits 2,
with no traceback. Every case runs through ``albef_ds.cli.main`` in this process
(tests/support/launch.py's in_process puts back the stop handlers it installs)."""
from tests.support.launch import in_process


def test_misconfigured_commands_print_one_line_and_exit_2(synth_data, tmp_path):
    data, tok = synth_data
    base = ["pretrain", "--config", "tiny", "--run-dir", str(tmp_path / "r"),
            "--set", f"data.train_dirs=[{data / 'train'}]", "--set", f"data.tokenizer={tok}"]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases = {
        # argv: what the one line must name
        "unknown key": (base + ["--set", "model.queue_sise=8"], "model.queue_sise"),
        "unknown preset": (["pretrain", "--config", "nope"], "nope"),
        "bad type": (base + ["--set", "train.max_steps=many"], "train.max_steps"),
        "missing data": (["pretrain", "--config", "tiny", "--set", "data.train_dirs=[/no/such/dir]",
                          "--set", f"data.tokenizer={tok}"], "/no/such/dir"),
        "missing ds_config": (base + ["--set", "distributed.ds_config=zero9_magic"], "distributed.ds_config"),
        "invalid ds_config": (base + ["--set", f"distributed.ds_config={bad_json}"], str(bad_json)),
        "unknown objective": (base + ["--set", "train.objective=vqa2"], "train.objective"),
        "eval without model": (["eval-retrieval", "--split", str(data / "test.json")], "--model"),
        "export of a non-checkpoint": (["export", str(tmp_path / "nothing")], str(tmp_path / "nothing")),
        "finetune without val split": (["finetune", "--config", "tiny", "--init", str(bad_json),  # (never read)
                                        "--set", f"data.train_dirs=[{data / 'train'}]",
                                        "--set", f"data.tokenizer={tok}"], "data.val_dir"),
    }
    for name, (argv, needle) in cases.items():
        rc, output = in_process(argv)
        lines = [x for x in output.splitlines() if x.startswith("albef-ds ")]
        assert rc == 2, (name, rc, output[-2000:])
        assert len(lines) == 1 and needle in lines[0], (name, output)
        assert "Traceback" not in output, (name, output)


def test_task_settings_the_files_show_wrong_are_refused_before_the_model_and_the_run_dir_lock(synth_data, tmp_path):
    """A VQA fine-tuning without task.answer_list was refused only when its first evaluation
    began: after the model was built, with the run directory created and locked. Now every
    such setting is one line naming the key, before either (no run directory is made)."""
    from tests.support.launch import synth_tasks
    _, tok = synth_data
    tasks = synth_tasks(tmp_path / "tasks", 8, 4, 4)
    run = tmp_path / "run"
    init = tmp_path / "init.pth"  # weights the command would start from (fresh ones: never trained)
    import torch

    from albef_ds.config import load_config
    from albef_ds.models import ALBEF
    from albef_ds.tokenizer import load_tokenizer
    torch.save({"model": ALBEF(load_config("tiny", [f"model.vocab_size={len(load_tokenizer(str(tok)))}"]).model)
                .state_dict()}, init)

    def finetune(task, train, val, *sets):
        sets = [f"task.train_files=[{tasks / train}]", f"task.val_file={tasks / val}", f"data.tokenizer={tok}",
                "train.micro_batch_size=4", "logging.progress_bar=false", *sets]
        return ["finetune", "--task", task, "--config", "tiny", "--init", str(init), "--run-dir", str(run),
                *[a for s in sets for a in ("--set", s)]]
    weights = tmp_path / "never_read.pth"  # eval refuses before it would read it
    weights.write_bytes(b"")
    evaluate = ["eval", "--task", "vqa", "--model", str(weights), "--config", "tiny", "--set", f"data.tokenizer={tok}"]
    cases = {  # argv: what the one line must say
        "vqa, no answer list": (finetune("vqa", "vqa_train.json", "vqa_val.json"),
                                "config key 'task.answer_list': VQA evaluation ranks a candidate list"),
        "vqa, answer list not there": (finetune("vqa", "vqa_train.json", "vqa_val.json",
                                                f"task.answer_list={tmp_path / 'nope.json'}"),
                                       f"config key 'task.answer_list': file not found: {tmp_path / 'nope.json'}"),
        "vqa, answer list not a list": (finetune("vqa", "vqa_train.json", "vqa_val.json",
                                                 f"task.answer_list={tasks / 'vqa_val.json'}"),
                                        "config key 'task.answer_list': "),
        "grounding, no such fusion layer": (finetune("grounding", "grounding_train.json", "grounding_val.json",
                                                     "task.gradcam_layer=7"), "config key 'task.gradcam_layer': 7"),
        "eval vqa, no answer list": (evaluate + ["--split", str(tasks / "vqa_test.json")], "task.answer_list"),
        "eval, no such split": (evaluate + ["--split", str(tmp_path / "nope.json"),
                                            "--set", f"task.answer_list={tasks / 'answer_list.json'}"],
                                f"--split {tmp_path / 'nope.json'}: file not found"),
    }
    for name, (argv, says) in cases.items():
        code, output = in_process(argv)
        lines = [x for x in output.splitlines() if x.startswith("albef-ds ")]
        assert code == 2 and len(lines) == 1 and says in lines[0], (name, code, output[-2000:])
        assert "Traceback" not in output and "albef-ds train" not in output, (name, output[-2000:])
        assert not run.exists(), (name, sorted(p.name for p in run.iterdir()))
