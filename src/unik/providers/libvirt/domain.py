"""The libvirt domain of an instance, as XML: direct kernel boot, its console and control
serial ports, user-mode networking (through qemu's own options when ports are published),
its volumes' disks, and unik's metadata by which the daemon finds its domains again."""

from __future__ import annotations

import uuid
from xml.sax.saxutils import escape, quoteattr

from unik import guest
from unik.kernel import BOOT_ARGS
from unik.models import LaunchSpec, VolumeAttachment
from unik.providers.libvirt.config import LibvirtProviderConfig

METADATA_NS = "https://unik.dev/xmlns/libvirt/1"


def volume_name(volume: VolumeAttachment) -> str:
    """The storage volume holding a unik volume's data on a host while an instance uses it."""
    return f"vol-{volume.serial}"


def disk_xml(volume: VolumeAttachment, path: str, index: int) -> str:
    """A volume's virtio disk; its serial is how the guest finds it."""
    return (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file={quoteattr(path)}/>"
            f"<target dev='vd{chr(ord('b') + index)}' bus='virtio'/><serial>{escape(volume.serial)}</serial>"
            "</disk>")  # fmt: skip


def network_xml(config: LibvirtProviderConfig, spec: LaunchSpec, gdb_port: int | None) -> tuple[str, str]:
    """(devices, qemu:commandline): user-mode networking, through qemu's own options when
    ports are published (libvirt forwards ports only with passt), and the gdb server."""
    args: list[str] = []
    if spec.ports:
        address = config.publish_address
        rules = "".join(f",hostfwd={p.Protocol}:{address}:{p.HostPort}-:{p.GuestPort}" for p in spec.ports)
        # A slot libvirt does not hand out (it numbers its own devices from 2 up).
        args += ["-netdev", f"user,id=unet{rules}", "-device", "virtio-net-pci,netdev=unet,romfile=,addr=0x1f"]
    if gdb_port is not None:
        args += ["-gdb", f"tcp:{config.publish_address}:{gdb_port}"]
    device = "" if spec.ports else "<interface type='user'><model type='virtio'/></interface>"
    commandline = "".join(f"<qemu:arg value={quoteattr(a)}/>" for a in args)
    return device, f"<qemu:commandline>{commandline}</qemu:commandline>" if args else ""


def kernel_cmdline(domain_type: str) -> str:
    # Under TCG: no APIC timer calibration, no PM timer check (kernel/boot.py says why).
    return " ".join([*BOOT_ARGS, "noapictimer", "pmtmr=0"] if domain_type == "qemu" else BOOT_ARGS)


def probe_xml(name: str, domain_type: str, kernel: str, initrd: str) -> str:
    """The smallest domain that shows whether `domain_type` boots on a host: the guest init
    alone, which prints its exit line when it finds no app."""
    return f"""<domain type='{domain_type}'><name>{escape(name)}</name><memory unit='MiB'>64</memory>
  <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><kernel>{escape(kernel)}</kernel>
  <initrd>{escape(initrd)}</initrd><cmdline>{escape(kernel_cmdline(domain_type))}</cmdline></os>
  <features><acpi/></features><on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>
  <devices><serial type='pty'><target port='0'/></serial><console type='pty'><target type='serial' port='0'/>
  </console><memballoon model='none'/></devices></domain>"""


def domain_xml(
    config: LibvirtProviderConfig,
    domain_type: str,
    daemon_id: str,
    instance_id: str,
    spec: LaunchSpec,
    paths: dict[str, str],
    disks: list[str],
    gdb_port: int | None,
) -> str:
    """`paths` names the host's files of the kernel, the initrd and the run archive."""
    interface, commandline = network_xml(config, spec, gdb_port)
    cmdline = kernel_cmdline(domain_type)
    return f"""<domain type='{domain_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>unik-{instance_id}</name>
  <uuid>{uuid.UUID(instance_id)}</uuid>
  <metadata><unik:instance xmlns:unik='{METADATA_NS}' id='{instance_id}' image='{spec.image_id}'
    daemon='{daemon_id}'/></metadata>
  <memory unit='MiB'>{spec.memory_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(paths["kernel"])}</kernel>
    <initrd>{escape(paths["initrd"])}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <sysinfo type='fwcfg'><entry name='{guest.FW_CFG_RUN_ARCHIVE}' file={quoteattr(paths["run"])}/></sysinfo>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model>
    <feature policy='require' name='rdrand'/></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <serial type='pty'><target port='1'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    {interface}
    {"".join(disks)}
    <memballoon model='none'/>
  </devices>
  {commandline}
</domain>"""
