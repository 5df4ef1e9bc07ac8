"""Compiler registry: names are `base-lang-provider`, as the original daemon listed them."""

from __future__ import annotations

from pathlib import Path

from unik.compilers.base import AppBundle, Compiler
from unik.compilers.linux_c import LinuxCCompiler
from unik.compilers.linux_cpp import LinuxCppCompiler
from unik.compilers.linux_go import LinuxGoCompiler
from unik.compilers.linux_java import LinuxJavaCompiler
from unik.compilers.linux_nodejs import LinuxNodejsCompiler
from unik.compilers.linux_python import LinuxPythonCompiler
from unik.compilers.linux_rust import LinuxRustCompiler
from unik.compilers.toolchain import BuildSettings
from unik.config import DaemonConfig
from unik.errors import BadRequest

__all__ = ["AppBundle", "BuildSettings", "Compiler", "CompilerRegistry"]


class CompilerRegistry:
    def __init__(self, providers: list[str], config: DaemonConfig | None = None, cache_dir: Path | None = None) -> None:
        settings = build_settings(config or DaemonConfig(), cache_dir)
        candidates: list[Compiler] = []
        for provider in providers:
            candidates.append(LinuxCCompiler(provider))
            candidates.extend(
                kind(provider, settings)
                for kind in (
                    LinuxCppCompiler,
                    LinuxGoCompiler,
                    LinuxJavaCompiler,
                    LinuxNodejsCompiler,
                    LinuxPythonCompiler,
                    LinuxRustCompiler,
                )
            )
        self._all = {c.name: c for c in candidates}

    def available(self) -> list[str]:
        return sorted(name for name, c in self._all.items() if c.missing_toolchain() is None)

    def lookup(self, base: str, lang: str, provider: str) -> Compiler | None:
        return self._all.get(f"{base}-{lang}-{provider}")

    def require(self, base: str, lang: str, provider: str) -> Compiler:
        compiler = self.lookup(base, lang, provider)
        if compiler is None:
            raise BadRequest(
                f"no compiler for base {base!r}, language {lang!r}, provider {provider!r}; "
                f"available: {', '.join(self.available()) or 'none'}"
            )
        missing = compiler.missing_toolchain()
        if missing:
            raise BadRequest(f"compiler {compiler.name} is not usable on this host: {missing}")
        return compiler


def build_settings(config: DaemonConfig, cache_dir: Path | None) -> BuildSettings:
    defaults = BuildSettings()
    return BuildSettings(
        network=config.build_network,
        cache_dir=cache_dir or defaults.cache_dir,
        python=config.python_interpreter or defaults.python,
        node=config.node_binary or defaults.node,
        java_home=config.java_home,
    )
