"""PACS bridge: a DICOM node that receives series, asks the neuroexplain service, and stores the results back.

Torch- and numpy-free: standard library, grpcio/protobuf (through :mod:`neuroexplain.client`), pydicom (SR objects),
pynetdicom (DICOM networking) and prometheus-client (metrics).
"""
