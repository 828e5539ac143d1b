"""What the service's own DICOM objects (the SR, the key image) copy from the images they
report on: identifiers exactly, everything else made valid for its VR (``values``), with one
character set and one UTC offset (``header``). See README, "Real-world DICOM"."""
