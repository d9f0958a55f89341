"""The bundled emulator of the edit API (an optional extra: imgedit[emulator])."""
