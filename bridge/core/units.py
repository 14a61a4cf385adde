"""Engineering units: profile unit symbols -> UNECE Recommendation 20 codes, as OPC UA wants them.

OPC UA (Part 8, EUInformation) identifies a unit by its UNECE common code,
packed into an Int32 UnitId: each character of the code, most significant first.
"""
from __future__ import annotations

from dataclasses import dataclass

CEFACT_NAMESPACE = "http://www.opcfoundation.org/UA/units/un/cefact"


@dataclass(frozen=True)
class Unit:
    code: str  # UNECE common code
    symbol: str  # what a display shows
    name: str

    @property
    def unit_id(self) -> int:
        value = 0
        for ch in self.code:
            value = (value << 8) | ord(ch)
        return value


# keyed by the symbol written in profiles
UNITS: dict[str, Unit] = {
    "V": Unit("VLT", "V", "volt"),
    "A": Unit("AMP", "A", "ampere"),
    "W": Unit("WTT", "W", "watt"),
    "kW": Unit("KWT", "kW", "kilowatt"),
    "var": Unit("D44", "var", "var"),
    "kvar": Unit("KVR", "kvar", "kilovar"),
    "VA": Unit("D46", "V·A", "volt - ampere"),
    "kVA": Unit("KVA", "kV·A", "kilovolt - ampere"),
    "Hz": Unit("HTZ", "Hz", "hertz"),
    "Wh": Unit("WHR", "W·h", "watt hour"),
    "kWh": Unit("KWH", "kW·h", "kilowatt hour"),
    "kvarh": Unit("K3", "kvar·h", "kilovolt ampere (reactive) hour"),
    "deg": Unit("DD", "°", "degree [unit of angle]"),
    "": Unit("C62", "1", "one"),  # dimensionless, e.g. power factor
    "%": Unit("P1", "%", "percent"),
}


def unit_for(symbol: str) -> Unit | None:
    return UNITS.get(symbol)
