"""Vela's names as the installed Vela knows them: accelerator configurations, and the system configurations and
memory modes of its bundled ``Arm/vela.ini`` (the checks of a target file's ``[vela]`` section,
:class:`edgeq.targets.VelaOptions`). Read from Vela itself, never listed by hand, so that a target file names only
what the ``vela`` edgeq runs accepts."""

from __future__ import annotations

import configparser
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator

VELA_CONFIG_FILE = "Arm/vela.ini"
"""The configuration file, relative to Vela's ``config_files`` folder, whose sections a target names (``vela
--config Arm/vela.ini``)."""

SYSTEM_CONFIG_PREFIX = "System_Config."
MEMORY_MODE_PREFIX = "Memory_Mode."


@cache
def accelerator_configs() -> tuple[str, ...]:
    """The ``--accelerator-config`` values Vela accepts (``ethos-u55-128``...)."""
    from ethosu.vela.architecture_features import Accelerator  # on first use: Vela imports numpy and its C++ core

    return tuple(Accelerator.member_list())


@cache
def _sections() -> tuple[str, ...]:
    from ethosu.vela.architecture_features import CONFIG_FILES_PATH

    parser = configparser.ConfigParser()
    parser.read(Path(CONFIG_FILES_PATH) / VELA_CONFIG_FILE)
    return tuple(parser.sections())


def system_configs() -> tuple[str, ...]:
    """The system configurations of Vela's ``Arm/vela.ini`` (``Ethos_U65_High_End``...)."""
    return tuple(s.removeprefix(SYSTEM_CONFIG_PREFIX) for s in _sections() if s.startswith(SYSTEM_CONFIG_PREFIX))


def memory_modes() -> tuple[str, ...]:
    """The memory modes of Vela's ``Arm/vela.ini`` (``Shared_Sram``, ``Dedicated_Sram_384KB``...)."""
    return tuple(s.removeprefix(MEMORY_MODE_PREFIX) for s in _sections() if s.startswith(MEMORY_MODE_PREFIX))


def vela_version() -> str:
    """The installed Vela's version (``5.2.0``)."""
    from importlib.metadata import version

    return version("ethos-u-vela")


class VelaOptions(BaseModel):
    """The options ``vela`` compiles an Ethos-U target's NPU regions with (a target file's ``[vela]`` section), each
    a name the installed Vela knows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accelerator_config: str
    """``--accelerator-config`` (``ethos-u65-256``)."""
    system_config: str
    """``--system-config``: a section of Vela's ``Arm/vela.ini`` (``Ethos_U65_High_End``)."""
    memory_mode: str
    """``--memory-mode``: a section of Vela's ``Arm/vela.ini`` (``Dedicated_Sram_384KB``)."""

    @field_validator("accelerator_config")
    @classmethod
    def _known_accelerator(cls, name: str) -> str:
        return _vela_knows(name, accelerator_configs(), "an accelerator config")

    @field_validator("system_config")
    @classmethod
    def _known_system(cls, name: str) -> str:
        return _vela_knows(name, system_configs(), f"a system config of its {VELA_CONFIG_FILE}")

    @field_validator("memory_mode")
    @classmethod
    def _known_memory_mode(cls, name: str) -> str:
        return _vela_knows(name, memory_modes(), f"a memory mode of its {VELA_CONFIG_FILE}")

    def arguments(self) -> list[str]:
        """The ``vela`` command-line options these name."""
        return [
            "--config", VELA_CONFIG_FILE, "--accelerator-config", self.accelerator_config,
            "--system-config", self.system_config, "--memory-mode", self.memory_mode,
        ]  # fmt: skip


def _vela_knows(name: str, known: tuple[str, ...], what: str) -> str:
    if name not in known:
        raise ValueError(f"'{name}' is not {what} Vela knows; Vela knows {', '.join(known)}")
    return name
