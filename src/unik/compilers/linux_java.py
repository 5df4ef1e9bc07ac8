"""linux-java-<provider>: a fat jar on a minimal Java runtime made with jlink from the host's JDK."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from unik.compilers import elf
from unik.compilers.base import AppBundle, Compiler, run_tool
from unik.compilers.linux_c import project_root
from unik.compilers.toolchain import (
    BUILD_COMMAND,
    BUILD_COMMAND_GUIDE,
    boot_memory_mb,
    build_command,
    copy_tree,
    image_root,
    inside,
    install_file,
    manifest_list,
    manifest_str,
    read_manifest,
    run_build_command,
    which,
)
from unik.errors import BadRequest

RUNTIME_DIR = "/opt/java"
GUEST_JAR = "/unik/app/app.jar"
# Small heaps, one or two vCPUs, often no KVM: the serial collector and C1 alone start fastest.
JVM_DEFAULTS = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData"]
JLINK_FLAGS = ["--strip-debug", "--no-man-pages", "--no-header-files", "--generate-cds-archive"]
MAIN_METHOD = re.compile(r"\bstatic\s+(?:final\s+)?void\s+main\s*\(")
PACKAGE = re.compile(r"^\s*package\s+([\w.]+)\s*;", re.MULTILINE)

DESCRIPTION = f"""\
linux-java: a Java program on a Linux micro-VM: its jar on a minimal runtime that `jlink`
makes from the daemon host's JDK (`java_home` in the daemon config; default the JDK of the
`jlink` on PATH), holding only the modules `jdeps` finds the jar using.

Prepare the project as a folder, packed as tar.gz (`unik build --path DIR` packs it for you):
  * A fat jar (all dependencies inside, Main-Class in its manifest, e.g. from maven-shade or
    gradle shadowJar), named in manifest.yaml at the top (the original UniK's rule):
        main_file: target/my-app-1.0-jar-with-dependencies.jar
    or, without manifest.yaml, the only *.jar in the folder.
{BUILD_COMMAND_GUIDE}
    E.g. `build_command: mvn package` with `main_file: target/x-jar-with-dependencies.jar`:
    the jar it makes is then the program. Maven and Gradle keep their caches in HOME, empty
    at each build: without the network a build needing a repository fails in their words.
  * Or, with no jar at all, plain *.java sources (standard library only): they are compiled
    with javac --release of the JDK and packed into a jar. The class with `static void
    main(` is the entry; with several, name it in manifest.yaml (`main_class: pkg.Main`).
  * Optional in manifest.yaml: `runtime_args: [-Xmx64m]` (JVM options, after unik's
    {' '.join(JVM_DEFAULTS)}) and `modules: [jdk.crypto.ec]` for modules only reached by
    reflection or service loading, which jdeps cannot see.
The program runs as {RUNTIME_DIR}/bin/java ... -jar {GUEST_JAR}; stdout/stderr are the
instance's logs, `--args` the program's arguments, `unik run --env K=V` its environment. A
graceful `unik stop` sends SIGTERM (shutdown hooks run). The JVM needs memory: the image's
default memory accounts for the runtime and heap.
"""


class LinuxJavaCompiler(Compiler):
    language = "java"
    guide = DESCRIPTION

    def java_home(self) -> Path | None:
        if self.settings.java_home is not None:
            return self.settings.java_home
        jlink = which("jlink")
        return jlink.parent.parent if jlink else None

    def missing_toolchain(self) -> str | None:
        home = self.java_home()
        tools = ("jlink", "jdeps", "java")
        if home is None or not all(os.access(home / "bin" / tool, os.X_OK) for tool in tools):
            return "a JDK with jlink and jdeps is not installed (Debian package openjdk-17-jdk-headless)"
        return None

    async def compile(self, source: Path, work: Path, *, timeout: float) -> AppBundle:
        project = project_root(source)
        work.mkdir(parents=True, exist_ok=True)
        home = self.java_home()
        if home is None or self.missing_toolchain():
            raise BadRequest(self.missing_toolchain() or "no JDK")
        manifest = read_manifest(project, {"main_file", "main_class", "runtime_args", "modules", BUILD_COMMAND})
        command = build_command(manifest)
        if command is not None:
            await run_build_command(command, project, work, timeout=timeout)
        jar = find_jar(project, manifest_str(manifest, "main_file"))
        # An uploaded jar may be the user's link to it (inside the upload: nothing has run yet);
        # one that build_command or javac and jar made is the build's output, a link there is
        # the build's doing.
        uploaded = jar is not None and command is None
        if jar is None:
            jar = await self._jar_from_sources(home, project, work, manifest_str(manifest, "main_class"), timeout)
        bin_dir = home / "bin"
        out = await run_tool(
            [str(bin_dir / "jdeps"), "--ignore-missing-deps", "--print-module-deps", "--multi-release", "base",
             str(jar)],
            cwd=work,
            timeout=timeout,
        )  # fmt: skip
        modules = sorted({"java.base", *parse_modules(out), *manifest_list(manifest, "modules")})
        cached = await self._runtime(home, modules, timeout)
        root = image_root(work, project)
        # The guest gets real files: Debian's JDK links some (cacerts, tzdb) to /etc and /usr/share.
        copy_tree(cached, root, RUNTIME_DIR, follow_links=True)
        install_file(root, GUEST_JAR, jar, mode=0o644, follow_links=uploaded)
        env = elf.bundle_shared_libraries(root, elf.elf_files(root, root / RUNTIME_DIR.lstrip("/")))
        return AppBundle(
            root=root,
            entrypoint=[
                f"{RUNTIME_DIR}/bin/java",
                *JVM_DEFAULTS,
                *manifest_list(manifest, "runtime_args"),
                "-jar",
                GUEST_JAR,
            ],
            env=env,
            memory_mb=boot_memory_mb(root, 128),
            runtime_min_mb=48,
        )

    async def _runtime(self, home: Path, modules: list[str], timeout: float) -> Path:
        """jlink's image for these modules, cached: the same modules give the same runtime."""
        release = (home / "release").read_bytes() if (home / "release").is_file() else str(home).encode()
        key = hashlib.sha256(release + repr((modules, JLINK_FLAGS)).encode()).hexdigest()[:16]
        cached = self.settings.cache_dir / "jlink" / key
        if not cached.is_dir():
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.parent / f".{key}-{uuid.uuid4().hex}"
            try:
                await run_tool(
                    [str(home / "bin" / "jlink"), "--add-modules", ",".join(modules), *JLINK_FLAGS, "--output",
                     str(tmp)],
                    cwd=cached.parent,
                    timeout=timeout,
                )  # fmt: skip
                await _slim(tmp, timeout)
                # Losing the race to another build of the same runtime is fine: it is the same.
                with contextlib.suppress(OSError):
                    tmp.rename(cached)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return cached

    async def _jar_from_sources(
        self, home: Path, project: Path, work: Path, main_class: str | None, timeout: float
    ) -> Path:
        sources = sorted(p for p in project.rglob("*.java") if p.is_file())
        if not sources:
            raise BadRequest(
                "no jar found: include the fat jar (named by manifest.yaml main_file, or the only *.jar) "
                "or *.java sources"
            )
        main = main_class or find_main_class(sources)
        classes = work / "classes"
        release = java_release(home)
        await run_tool(
            [str(home / "bin" / "javac"), "--release", release, "-d", str(classes), *map(str, sources)],
            cwd=project,
            timeout=timeout,
        )
        jar = work / "app.jar"
        await run_tool(
            [str(home / "bin" / "jar"), "--create", "--file", str(jar), "--main-class", main, "-C", str(classes), "."],
            cwd=project,
            timeout=timeout,
        )
        return jar


async def _slim(runtime: Path, timeout: float) -> None:
    """Drop what a small guest never uses: the CDS archive for heaps over 32 GB, native symbols."""
    # In the sandbox, like jlink: the toolchain cache is writable by every build, which could
    # swap a folder of `runtime` for a link while the daemon removed or chmod-ed through it.
    await run_tool(["rm", "-f", str(runtime / "lib" / "server" / "classes_nocoops.jsa")], cwd=runtime, timeout=timeout)
    strip = which("strip")
    if strip is None:
        return
    objects = [str(runtime / path.lstrip("/")) for path in elf.elf_files(runtime)]
    if not objects:
        return
    await run_tool(["chmod", "755", *objects], cwd=runtime, timeout=timeout)
    # Debian's libjvm.so keeps its symbol table (4 MB); jlink's own stripping leaves it.
    await run_tool([str(strip), "--strip-unneeded", *objects], cwd=runtime, timeout=timeout)


def find_jar(project: Path, named: str | None) -> Path | None:
    if named is not None:
        return inside(project, named, "manifest.yaml main_file")
    jars = sorted(
        p for p in project.rglob("*.jar")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(project).parts)
    )  # fmt: skip
    if len(jars) > 1:
        names = ", ".join(str(p.relative_to(project)) for p in jars)
        raise BadRequest(f"several jars ({names}): name the fat jar in manifest.yaml (`main_file: app.jar`)")
    return jars[0] if jars else None


def find_main_class(sources: list[Path]) -> str:
    mains = []
    for source in sources:
        text = source.read_text(errors="replace")
        if MAIN_METHOD.search(text):
            package = PACKAGE.search(text)
            mains.append(f"{package.group(1)}.{source.stem}" if package else source.stem)
    if len(mains) != 1:
        raise BadRequest(
            f"{'several classes have' if mains else 'no class has'} a main method {mains or ''}; "
            "name the entry in manifest.yaml (`main_class: pkg.Main`)"
        )
    return mains[0]


def java_release(home: Path) -> str:
    """The JDK's feature version (17), from its `release` file."""
    release = home / "release"
    if release.is_file():
        match = re.search(r'^JAVA_VERSION="(\d+)', release.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return "17"


def parse_modules(jdeps_output: str) -> list[str]:
    """jdeps --print-module-deps ends with one line like `java.base,jdk.httpserver`."""
    for line in reversed(jdeps_output.strip().splitlines()):
        line = line.strip()
        if line and re.fullmatch(r"[\w.]+(,[\w.]+)*", line):
            return line.split(",")
    raise BadRequest(f"jdeps did not list the jar's modules:\n{jdeps_output[-2000:]}")
