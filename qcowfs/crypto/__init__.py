"""Encryption of an image's guest data: the sector ciphers QEMU's qcow2 driver uses
(sector_cipher.py) and the LUKS1 key slots that give their key (unlock.py). Computation only:
no file is opened here; the engine hands in the bytes it read (docs/encryption.md)."""
