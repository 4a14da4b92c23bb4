"""Headless Chromium for tests/test_page.py: Debian's ``chromium`` and ``chromium-driver`` packages
(Playwright and Selenium Manager cannot download browsers here). ``python tests/emulators.py
install`` (which ``./dev test`` and CI run) installs them with apt-get when missing and root."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PACKAGES = ["chromium", "chromium-driver"]
LOG = ROOT / ".chromium-install.log"


def present() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)


def install(log=sys.stderr) -> bool:
    """Install the packages when missing; True when the browser is there afterwards."""
    if present():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"chromium missing: install it with `apt-get install -y {' '.join(PACKAGES)}` "
              "(tests/test_page.py needs it)", file=log, flush=True)
        return False
    print(f"installing {' '.join(PACKAGES)} with apt-get (first run only; log {LOG})...", file=log, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(LOG, "w") as out:
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            if done.returncode != 0:
                print(f"{' '.join(argv)} failed ({done.returncode}); see {LOG}", file=log, flush=True)
                return False
    return present()


def driver(width: int = 1280, height: int = 1000):
    """A headless Chrome WebDriver on Debian's chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}", "--force-device-scale-factor=1", "--lang=en-US"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


if __name__ == "__main__":
    sys.exit(0 if install() else 1)
