"""The README and the pages under docs/ quote every measured figure from the benchmark report, so that two answers
to one question cannot appear, and every link between them leads somewhere."""
import json
import re

import pytest

from conftest import ROOT

REPORT = ROOT / "benchmarks" / "results" / "README.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# what a measurement looks like in prose: a ratio (0.78x), seconds, images/s, GiB of memory, an accuracy (0.9774)
FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?x|\d+(?:\.\d+)? (?:s|images/s|GiB)|0\.\d{4})(?!\w|\.\d)")


def report_section(title):
    """The report's section under the heading `title`, up to the next one."""
    return REPORT.read_text().split(f"## {title}\n")[1].split("\n## ")[0]


def table_rows(text):
    """The cells of each body row of the markdown tables in `text` (their header and separator rows left out)."""
    lines = text.splitlines()
    return [line.strip("| ").split(" | ") for line, following in zip(lines, [*lines[1:], ""])
            if line.startswith("| ") and not line.startswith("| ---") and not following.startswith("| ---")]


def prose(page):
    """The page without its fenced code blocks (commands and sample output, not quoted figures)."""
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_figure_of_a_page_is_in_the_report(page):
    report = REPORT.read_text()
    missing = sorted({figure for figure in FIGURE.findall(prose(page)) if figure not in report})
    assert not missing, f"{page.name} quotes figures the report does not hold: {missing}"


@pytest.mark.parametrize("page", [*PAGES, REPORT], ids=lambda page: page.name)
def test_every_relative_link_leads_to_a_file(page):
    targets = re.findall(r"\]\((?!https?:)([^)#]+)(?:#[^)]*)?\)", page.read_text())
    broken = [target for target in targets if not (page.parent / target).exists()]
    assert not broken, f"{page.name} links to what does not exist: {broken}"


def test_the_end_to_end_table_is_its_raw_data():
    """Each row of the report's end-to-end table holds what end_to_end.json keeps: the median run's wall time (the
    ratios taken against the recipe's two rows) and that run's own figures."""
    summary = json.loads((REPORT.parent / "end_to_end.json").read_text())
    recipe_wall, saving_wall = summary["recipe"]["wall_seconds"], summary["recipe_saving"]["wall_seconds"]

    def walls(run):
        repeats = run["all_wall_seconds"].values()
        spread = f"{min(repeats):.1f}-{max(repeats):.1f}" if len(repeats) > 1 else ""
        return (f"{run['wall_seconds']:.1f} | {spread} | "
                f"{run['wall_seconds'] / recipe_wall:.2f}x | {run['wall_seconds'] / saving_wall:.2f}x")
    expected = [f"| {title} | 1 | {walls(summary[name])} | {summary[name]['setup_seconds']:.1f} | "
                f"{summary[name]['train_seconds']:.1f} ({included} included) | | | | | "
                f"{summary[name]['validation_accuracy']:.4f} | {summary[name]['test_accuracy']:.4f} |"
                for name, title, included in (("recipe", "Hugging Face recipe, writing nothing", "evaluation"),
                                              ("recipe_saving", "Hugging Face recipe, saving as the example does",
                                               "evaluation and checkpoints"))]
    for plugin, run in summary["plugins"].items():
        seconds = run["seconds"]
        parts = ", ".join(f"{part:.1f}" for part in seconds["setup_parts"].values())
        expected.append(f"| {plugin} | {run['config']['world_size']} | {walls(run)} | "
                        f"{seconds['setup']:.1f}: {parts} | {seconds['train']:.1f} | {seconds['data_wait']:.2f} | "
                        f"{seconds['evaluation']:.1f} | {seconds['checkpoints']:.1f} | "
                        f"{run['wall_seconds'] - seconds['total']:.1f} | "
                        f"{run['epochs'][-1]['validation']['accuracy']:.4f} | {run['test']['accuracy']:.4f} |")
    assert table_rows(report_section("End to end")) == table_rows("\n".join(expected))


def test_the_streaming_table_is_its_raw_data():
    """Each row of the report's streaming table holds the figures streaming.json keeps for that run."""
    runs = json.loads((REPORT.parent / "streaming.json").read_text())["runs"]
    section = report_section("Streaming")
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in section.splitlines()
                                          if line.startswith("| example") or line.startswith("| Hugging Face"))}
    assert sorted(rows) == sorted(runs)
    for name, run in runs.items():
        cells = rows[name]
        assert cells[1:4] == [str(run["train_images"]), str(run["epochs"]), f"{run['images_per_second']:.0f}"]
        assert cells[-3:] == [f"{run['peak_host_gib']:.2f}", f"{run['peak_gpu_gib']:.2f}",
                              f"{run['validation_accuracy']:.4f}"]


def test_the_modes_table_is_its_raw_data():
    """Each row of the report's fine-tuning modes table holds the means over seeds that modes.json keeps."""
    import statistics
    modes = json.loads((REPORT.parent / "modes.json").read_text())
    section = report_section("Fine-tuning modes")
    rows = {cells[0]: cells for cells in table_rows(section)}
    assert sorted(rows) == sorted(modes)
    for name, mode in modes.items():
        runs = mode["runs"]
        mean = {key: statistics.mean(run[key] for run in runs) for key in runs[0]}
        assert rows[name][1:] == [mode["settings"], str(len(runs)), str(runs[0]["trained_parameters"]),
                                  f"{mean['images_per_second']:.0f}", f"{mean['peak_gpu_gib']:.2f}",
                                  f"{mean['validation_accuracy']:.4f}", f"{mean['test_accuracy']:.4f}"]


def test_the_lora_table_is_its_raw_data():
    """Each row of the report's LoRA and QLoRA table holds what lora_largest.json keeps for that configuration and
    size."""
    rows = json.loads((REPORT.parent / "lora_largest.json").read_text())["rows"]
    section = report_section("LoRA and QLoRA on large models").split("\n### ")[0]
    printed = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| torch_ddp")]

    def cell(value, form):
        return "-" if value is None else format(value, form)
    assert printed == [[row["configuration"], row["model"], f"{row['parameters'] / 1e9:.2f}B",
                        str(row["batch_size_per_gpu"]), row["result"], cell(row["images_per_second"], ".1f"),
                        cell(row["step_ms"], ".0f"), cell(row["peak_gib"], ".2f"), cell(row["resident_gib"], ".2f"),
                        cell(row["peak_host_gib"], ".2f")] for row in rows]


def test_the_lora_speed_table_is_its_raw_data():
    """Each row of the report's table of LoRA against full fine-tuning with offload holds what
    lora_speed_<size>.json keeps, the ratio taken against the full fine-tuning of that file."""
    section = report_section("LoRA and QLoRA on large models").split("### LoRA against full fine-tuning with offload")[1]
    section = section.split("Through `run_finetuning.sh`")[0]
    printed = table_rows(section)
    expected = []
    for size in ("vit_g", "6.5b"):
        rows = json.loads((REPORT.parent / f"lora_speed_{size}.json").read_text())["rows"]
        full = next(row for row in rows if "+lora" not in row["configuration"])
        for row in sorted(rows, key=lambda row: "+lora" in row["configuration"]):
            expected.append([row["configuration"], row["model"], f"{row['parameters'] / 1e9:.2f}B",
                             str(row["batch_size_per_gpu"]), f"{row['images_per_second']:.1f}",
                             f"{row['images_per_second'] / full['images_per_second']:.2f}x", f"{row['step_ms']:.0f}",
                             "-" if row["mfu"] is None else f"{row['mfu']:.1%}", f"{row['peak_gib']:.2f}",
                             f"{row['peak_host_gib']:.2f}"])
    assert printed == expected


def test_the_lora_run_table_is_its_raw_data():
    """Each row of the report's table of LoRA through run_finetuning.sh holds what lora_run_finetuning.json keeps."""
    runs = json.loads((REPORT.parent / "lora_run_finetuning.json").read_text())
    section = report_section("LoRA and QLoRA on large models").split("Through `run_finetuning.sh`")[1]
    printed = table_rows(section)
    assert printed == [[size, f"{run['wall_seconds']:.1f}", f"{run['setup_seconds']:.1f}",
                        f"{run['images_per_second']:.1f}", f"{run['last_epoch_images_per_second']:.1f}",
                        f"{run['peak_gpu_gib']:.2f}", f"{run['peak_host_gib']:.2f}", str(run["trained_parameters"])]
                       for size, run in runs.items()]


def test_the_startup_table_is_its_raw_data():
    variants = json.loads((REPORT.parent / "startup.json").read_text())["variants"]
    section = report_section("Start-up")
    printed = table_rows(section)

    def cell(seconds):
        return "-" if seconds is None else f"{seconds:.2f}"
    assert printed == [[name, cell(row["wall_seconds"]), cell(row["cpu_seconds"]),
                        cell(row["import_seconds"]["bitsandbytes"]), cell(row["import_seconds"]["sklearn"])]
                       for name, row in variants.items()]


def test_the_training_steps_table_is_its_raw_data():
    """Each row of the report's training-steps table holds what steps.json keeps, and the GPU time its profile in
    steps_profiles/ measured."""
    expected = []
    for row in json.loads((REPORT.parent / "steps.json").read_text())["rows"]:
        profile = REPORT.parent / "steps_profiles" / f"{row['configuration']}_B_16_b{row['batch_size_per_gpu']}.txt"
        kernel_ms = re.search(r"([\d.]+) ms of GPU kernels", profile.read_text()).group(1)
        expected.append([row["configuration"], str(row["batch_size_per_gpu"]), f"{row['images_per_second']:.0f}",
                         f"{row['vs_eager_reference']:.2f}x", f"{row['step_ms']:.1f}", f"{row['mfu']:.1%}", kernel_ms])
    assert table_rows(report_section("Training steps")) == expected


def test_the_fastest_batch_table_is_its_raw_data():
    """Each row of the report's table of offloaded training at its fastest batch holds what fastest_<size>.json keeps,
    the ratio taken against the same configuration's smallest batch; a row that did not train has no figures."""
    expected = []
    for size in ("vit_g", "6.5b"):
        smallest_batch = {}
        for row in json.loads((REPORT.parent / f"fastest_{size}.json").read_text())["rows"]:
            first = smallest_batch.setdefault(row["configuration"], row)
            figures = ["-"] * 7 if row["result"] != "trains" else [
                f"{row['images_per_second']:.1f}", f"{row['images_per_second'] / first['images_per_second']:.2f}x",
                f"{row['step_ms']:.0f}", f"{row['model_tflops_per_second']:.1f}", f"{row['mfu']:.1%}",
                f"{row['peak_gib']:.2f}", f"{row['peak_host_gib']:.2f}"]
            expected.append([row["configuration"], f"{row['model']} ({row['parameters'] / 1e9:.2f}B)",
                             str(row["batch_size_per_gpu"]), row["result"], *figures])
    assert table_rows(report_section("Offloaded training at its fastest batch")) == expected


def test_the_checkpoint_table_is_its_raw_data():
    """Each row of the report's checkpoint table holds what checkpoint_<configuration>_<size>.json keeps: each
    checkpoint the example wrote, then Colossal-AI's booster saving the same state."""
    expected = []
    for name in ("torch_ddp_B_16", "gemini_B_16", "gemini_all_G_14"):
        table = json.loads((REPORT.parent / f"checkpoint_{name}.json").read_text())
        written = table["checkpoints"]
        expected += [[table["configuration"], table["model"], f"step {checkpoint['step']}", f"{checkpoint['gib']:.2f}",
                      f"{checkpoint['seconds']:.2f}", f"{checkpoint['write_seconds']:.2f}",
                      str(checkpoint["steps_beside_write"]),
                      f"{checkpoint['step_seconds_beside_write']:.3f}, {checkpoint['step_seconds_alone']:.3f}"]
                     for checkpoint in written]
        peer = table["colossalai_booster_save"]
        expected.append([table["configuration"], table["model"], "Colossal-AI's booster", f"{peer['gib']:.2f}",
                         f"{peer['seconds']:.2f}", "-", "-", "-"])
    assert table_rows(report_section("Checkpoints")) == expected


def test_the_largest_model_table_is_its_raw_data():
    """Each row of the report's largest-model table holds what largest.json keeps, figures only where a size trains."""
    expected = []
    for row in json.loads((REPORT.parent / "largest.json").read_text())["rows"]:
        figures = ["-"] * 7 if row["result"] != "trains" else [
            f"{row['images_per_second']:.1f}", f"{row['step_ms']:.0f}", f"{row['model_tflops_per_second']:.1f}",
            f"{row['mfu']:.1%}", f"{row['peak_gib']:.2f}", f"{row['resident_gib']:.2f}", f"{row['peak_host_gib']:.2f}"]
        expected.append([row["configuration"], row["model"], f"{row['parameters'] / 1e9:.2f}B", row["result"],
                         *figures])
    assert table_rows(report_section("Largest model").split("### ViT-G/14")[0]) == expected


def test_the_vit_g_table_is_its_raw_data():
    """Each row of the report's ViT-G/14 table holds what vit_g.json keeps, the ratio taken against DeepSpeed's row."""
    rows = json.loads((REPORT.parent / "vit_g.json").read_text())["rows"]
    peer = next(row for row in rows if row["configuration"] == "deepspeed_zero2_offload")
    expected = [[row["configuration"], row["result"], f"{row['images_per_second']:.1f}",
                 f"{row['images_per_second'] / peer['images_per_second']:.2f}x", f"{row['step_ms']:.0f}",
                 f"{row['model_tflops_per_second']:.1f}", f"{row['mfu']:.1%}", f"{row['peak_gib']:.2f}",
                 f"{row['peak_host_gib']:.2f}"] for row in rows]
    assert table_rows(report_section("Largest model").split("### ViT-G/14")[1]) == expected


def test_the_accuracy_tables_are_their_raw_data():
    """The report's recipe table holds the medians and means accuracy.json keeps for each recipe over its seeds, and
    its upstream-grid table each run of the grid."""
    summary = json.loads((REPORT.parent / "accuracy.json").read_text())
    expected = [[name, recipe["settings"] or "-",
                 f"{recipe['final validation']['median']:.4f} ({recipe['final validation']['mean']:.4f})",
                 f"{recipe['final test']['median']:.4f} ({recipe['final test']['mean']:.4f})"]
                for name, recipe in summary["recipes"].items()]
    expected += [[str(run["batch_size"]), f"{run['learning_rate']:g}", f"{run['train_loss']:.4f}",
                  f"{run['validation']['loss']:.4f}", f"{run['validation']['accuracy']:.4f}",
                  f"{run['test']['loss']:.4f}", f"{run['test']['accuracy']:.4f}"] for run in summary["upstream_grid"]]
    assert table_rows(report_section("Accuracy")) == expected
