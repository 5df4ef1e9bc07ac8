"""Compiler registry: names are `base-lang-provider`, as the original daemon listed them."""

from __future__ import annotations

from unik.compilers.base import AppBundle, Compiler
from unik.compilers.linux_c import LinuxCCompiler
from unik.errors import BadRequest

__all__ = ["AppBundle", "Compiler", "CompilerRegistry"]


class CompilerRegistry:
    def __init__(self, providers: list[str]) -> None:
        candidates: list[Compiler] = [LinuxCCompiler(provider) for provider in providers]
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
