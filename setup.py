"""Only what pyproject.toml cannot say: ship `fxlora_startup.pth` into site-packages.

Python's `site` runs a `.pth` file's `import` lines at start-up; this one imports
`fxlora_startup`, the hook that lets `torch_compile_backend="fxlora"` pass accelerate's
backend check without `import fxlora` (fxlora_startup.py says what it does and costs).
A regular wheel gets the file from build_py; an editable (PEP 660) wheel, built without
build_lib's files, gets it appended by editable_wheel.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "fxlora_startup.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


commands = {"build_py": BuildPyWithPth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: `develop` installs, no .pth hook
    editable_wheel = None

if editable_wheel is not None:

    class EditableWheelWithPth(editable_wheel):
        def _create_wheel_file(self, bdist_wheel):
            wheel_path = super()._create_wheel_file(bdist_wheel)
            _append_to_wheel(wheel_path, PTH, open(os.path.join(HERE, PTH), "rb").read())
            return wheel_path

    commands["editable_wheel"] = EditableWheelWithPth


def _append_to_wheel(wheel_path: str, name: str, data: bytes) -> None:
    """Add one file at the wheel's root and list it in RECORD (with its hash) so installers accept it."""
    import base64
    import hashlib
    import zipfile

    with zipfile.ZipFile(wheel_path) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        entries = {n: zf.read(n) for n in zf.namelist()}
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    lines = entries[record].decode().splitlines()
    lines.insert(len(lines) - 1 if lines and lines[-1].startswith(record) else len(lines), f"{name},sha256={digest},{len(data)}")
    entries[name] = data
    entries[record] = ("\n".join(lines) + "\n").encode()
    with zipfile.ZipFile(wheel_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in entries.items():
            zf.writestr(n, d)


setup(cmdclass=commands)
