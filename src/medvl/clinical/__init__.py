"""Clinical formats: DICOM and NIfTI input, display windows, DICOM de-identification.

Submodules (import them directly; they need the ``[clinical]`` extra: pydicom, nibabel,
dicognito, requests, pynetdicom, and the pylibjpeg / gdcm decoders for compressed DICOM):

- ``medvl.clinical.windowing``: named CT window presets (HU) and the DICOM window functions;
- ``medvl.clinical.dicom``: ``read_dicom``, ``read_dicom_series``, ``load_volume``;
- ``medvl.clinical.nifti``: ``read_nifti`` (RAS volume and spacing, decompression-bomb guard);
- ``medvl.clinical.deid``: ``deidentify`` (DICOM PS3.15 basic profile via dicognito);
- ``medvl.clinical.profile``: PS3.15 Table E.1-1 as data (``profile_table``) and ``apply_profile``;
- ``medvl.clinical.pacs``: ``DicomWebClient`` (QIDO-RS / WADO-RS) and ``pull_study`` (de-identifying,
  resumable pulls into a folder; needs ``requests``);
- ``medvl.clinical.dimse``: ``DimseClient`` (C-ECHO, C-FIND, C-GET / C-MOVE pulls; needs ``pynetdicom``);
- ``medvl.clinical.pull``: ``run_pull``, the protocol-neutral pull (de-identify, write, resume, report);
- ``medvl.clinical.readers``: the readers ``medvl.data.images.read_image`` registers (light).
"""
