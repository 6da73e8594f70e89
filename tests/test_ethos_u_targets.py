"""The Arm Ethos-U targets: their files load, their figures are Vela's own, their [vela] options are names Vela
knows (a wrong one is an error naming the file, the key and what Vela knows), and the U55's firmware host."""

from __future__ import annotations

from pathlib import Path

import pytest
from ethosu.vela.architecture_features import ArchitectureFeatures

from edgeq.errors import TargetError
from edgeq.targets import Rounding, ScaleRule, TargetKind, host_cpu, load_target
from edgeq.vela_configs import VELA_CONFIG_FILE, accelerator_configs, memory_modes, system_configs

ETHOS_U = ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256")
TARGETS = Path(__file__).resolve().parent.parent / "targets"


@pytest.mark.parametrize("name", ETHOS_U)
def test_ethos_u_target_loads(name):
    target = load_target(name)
    assert target.kind is TargetKind.NPU and target.vela.accelerator_config == name
    assert target.quantization.rounding is Rounding.HALF_UP and target.quantization.scale_rule is ScaleRule.ANY
    assert "upsample_bilinear2d" not in target.npu.ops and "TOSA RESIZE" in target.npu.why_not["upsample_bilinear2d"]


@pytest.mark.parametrize("name", ETHOS_U)
def test_figures_are_velas(name):
    """MACs per cycle, clock and the AXI1 port's bandwidth as Vela's own architecture model reads them from its
    vela.ini; the SRAM size too where the memory mode gives one (Shared_Sram does not: the U55's is its board's)."""
    target = load_target(name)
    vela = target.vela
    from ethosu.vela.architecture_features import CONFIG_FILES_PATH, MemArea
    from ethosu.vela.tensor import BandwidthDirection

    arch = ArchitectureFeatures(
        vela_config_files=[str(Path(CONFIG_FILES_PATH) / VELA_CONFIG_FILE)],
        accelerator_config=vela.accelerator_config,
        system_config=vela.system_config,
        memory_mode=vela.memory_mode,
        max_blockdep=ArchitectureFeatures.MAX_BLOCKDEP,
        verbose_config=False,
        arena_cache_size=None,
    )
    assert target.hardware.int8_macs_per_cycle == arch.num_macs_per_cycle
    assert target.hardware.clock_hz == arch.core_clock
    assert target.hardware.dram_bandwidth_bytes_per_s == arch.memory_bandwidths_per_second[arch.axi1_port]
    assert arch.axi0_port is MemArea.Sram
    if vela.memory_mode != "Shared_Sram":
        assert target.hardware.sram_bytes == arch.arena_cache_size
    if not arch.is_ethos_u85_system:
        assert target.hardware.vector_ops_per_cycle == arch.config.elem_units
    hardware = target.hardware  # the memory model's figures (docs/perf.md, "NPU layers by blocks")
    assert hardware.sram_burst_bytes == arch.memory_burst_length[MemArea.Sram]
    assert hardware.dram_burst_bytes == arch.memory_burst_length[arch.axi1_port]
    assert hardware.region_io_in_dram == (arch._mem_port_mapping(arch.arena_mem_area) == arch.axi1_port)
    assert hardware.dram_read_latency_cycles == arch.memory_latency[arch.axi1_port][BandwidthDirection.Read]
    if hardware.region_io_in_dram:  # the U55 writes nothing to its flash
        assert hardware.dram_write_latency_cycles == arch.memory_latency[arch.axi1_port][BandwidthDirection.Write]
    assert hardware.sram_latency_cycles == arch.memory_latency[MemArea.Sram][BandwidthDirection.Read]
    assert hardware.sram_latency_cycles == arch.memory_latency[MemArea.Sram][BandwidthDirection.Write]
    if not arch.is_ethos_u85_system:  # the SHRAM and the output stage's cycles per element (the U85's are in Vela's C++ core)
        assert hardware.shram_bytes == arch.shram_size_bytes
        output, activation = arch.output_cycles_per_elem, arch.activation_cycles_per_elem
        assert hardware.output_cycles_per_element == output[7] and hardware.lookup_table_cycles_per_element == activation[0]
        # edgeq's TOSA forms as Vela runs them: add = two RESCALEs to int32 (an 8-bit Add, a 32-bit Mul each) and
        # the 32-bit Add; mul = one 8-bit Mul (its RESCALE fused)
        assert hardware.elementwise_cycles == {"add": 2 * (output[5] + output[1]) + output[1], "mul": output[3]}


def test_hosts():
    assert host_cpu(load_target("ethos-u65-256")).name == "aarch64" == host_cpu(load_target("ethos-u85-256")).name
    u55 = load_target("ethos-u55-128")
    assert u55.host is None and u55.firmware_host == "Cortex-M55"
    with pytest.raises(TargetError, match=r"^ethos-u55-128's host is a Cortex-M55, which edgeq builds no code for \(it runs your firmware\)$"):
        host_cpu(u55)


def test_vela_names_come_from_vela():
    assert "ethos-u55-128" in accelerator_configs() and "ethos-u85-2048" in accelerator_configs()
    assert {"Ethos_U55_High_End_Embedded", "Ethos_U65_High_End", "Ethos_U85_SYS_DRAM_Mid"} <= set(system_configs())
    assert {"Shared_Sram", "Dedicated_Sram", "Dedicated_Sram_384KB"} <= set(memory_modes())


@pytest.mark.parametrize(
    "old,new,message",
    [
        ('accelerator_config = "ethos-u65-256"', 'accelerator_config = "ethos-u65-128"',
         r"vela.accelerator_config: 'ethos-u65-128' is not an accelerator config Vela knows; Vela knows ethos-u55-32, .*ethos-u65-256"),
        ('system_config = "Ethos_U65_High_End"', 'system_config = "Ethos_U65_Highest_End"',
         r"vela.system_config: 'Ethos_U65_Highest_End' is not a system config of its Arm/vela.ini Vela knows; Vela knows .*Ethos_U65_High_End"),
        ('memory_mode = "Dedicated_Sram_384KB"', 'memory_mode = "Dedicated_Sram_1MB"',
         r"vela.memory_mode: 'Dedicated_Sram_1MB' is not a memory mode of its Arm/vela.ini Vela knows; Vela knows .*Shared_Sram"),
        ('memory_mode = "Dedicated_Sram_384KB"\n', "", r"vela.memory_mode: Field required"),
        ('memory_mode = "Dedicated_Sram_384KB"', 'memory_mode = "Dedicated_Sram_384KB"\narena_cache_size = 1',
         r"vela.arena_cache_size: Extra inputs are not permitted"),
    ],
)
def test_vela_section_refused(tmp_path, old, new, message):
    text = (TARGETS / "ethos-u65-256.toml").read_text()
    assert old in text
    path = tmp_path / "ethos-u65-256.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(TargetError, match=message) as error:
        load_target(path)
    assert str(error.value).startswith(str(path))
