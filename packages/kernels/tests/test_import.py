import subprocess
import sys


def test_import_touches_no_gpu_and_imports_no_transformers():
    code = (
        "import sys, torch\n"
        "import swiftune_kernels\n"
        "assert not torch.cuda.is_initialized(), 'importing swiftune_kernels initialised CUDA'\n"
        "bad = sorted(m for m in ('transformers', 'peft', 'trl', 'datasets', 'bitsandbytes') if m in sys.modules)\n"
        "assert not bad, f'importing swiftune_kernels imported {bad}'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
