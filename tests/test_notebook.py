"""The quick-start notebook runs top to bottom (tiny config, CPU)."""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, xla_flags


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("MMJAX_NOTEBOOK_CONFIG", "demo:tiny")
  monkeypatch.setenv("MMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  monkeypatch.setenv("XLA_FLAGS", xla_flags())      # the kernel's (conftest.xla_flags)
  nb = nbformat.read(ROOT / "colab" / "quickstart.ipynb", as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs)
  assert "zeroshot_color_acc" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 2          # the zero-shot grid and the training curves
  assert (tmp_path / "run" / "training.png").exists()


@pytest.mark.slow
def test_finetune_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("MMJAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("MMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  monkeypatch.setenv("XLA_FLAGS", xla_flags())      # the kernel's (conftest.xla_flags)
  nb = nbformat.read(ROOT / "colab" / "finetune.ipynb", as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs)
  assert "test accuracy" in text and "weighted avg" in text and "precision" in text
  assert [o for o in outputs if "image/png" in o.get("data", {})]      # the confusion matrix
  assert (tmp_path / "run" / "lora" / "reports" / "report.json").exists()


@pytest.mark.slow
def test_caption_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("MMJAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("MMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  monkeypatch.setenv("XLA_FLAGS", xla_flags())      # the kernel's (conftest.xla_flags)
  nb = nbformat.read(ROOT / "colab" / "caption.ipynb", as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs)
  assert text.count("reference:") == 6 and text.count("beam 4:") == 6
  assert [o for o in outputs if "image/png" in o.get("data", {})]      # the captioned images
  assert (tmp_path / "run" / "checkpoints").is_dir()
