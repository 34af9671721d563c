"""Qt-free logic of the IXGSStandardize module (see ``logic``)."""
