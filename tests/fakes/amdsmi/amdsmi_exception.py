"""Fake of amdsmi.amdsmi_exception: the same exception classes, attributes and str() shapes."""

from . import amdsmi_wrapper as _w

_DESCRIPTIONS = {
    _w.AMDSMI_STATUS_INVAL: "Invalid parameters",
    _w.AMDSMI_STATUS_NOT_SUPPORTED: "Feature not supported",
    _w.AMDSMI_STATUS_NOT_YET_IMPLEMENTED: "Feature not yet implemented",
    _w.AMDSMI_STATUS_FAIL_LOAD_MODULE: "Fail to load lib",
    _w.AMDSMI_STATUS_FAIL_LOAD_SYMBOL: "Fail to load symbol",
    _w.AMDSMI_STATUS_DRM_ERROR: "Error when called libdrm",
    _w.AMDSMI_STATUS_API_FAILED: "API call failed",
    _w.AMDSMI_STATUS_TIMEOUT: "Timeout in API call",
    _w.AMDSMI_STATUS_RETRY: "Retry operation",
    _w.AMDSMI_STATUS_NO_PERM: "Permission Denied",
    _w.AMDSMI_STATUS_INTERRUPT: "Interrupt occurred during execution",
    _w.AMDSMI_STATUS_IO: "I/O Error",
    _w.AMDSMI_STATUS_ADDRESS_FAULT: "Bad address",
    _w.AMDSMI_STATUS_FILE_ERROR: "Error opening file",
    _w.AMDSMI_STATUS_OUT_OF_RESOURCES: "Not enough memory",
    _w.AMDSMI_STATUS_INTERNAL_EXCEPTION: "Internal error",
    _w.AMDSMI_STATUS_INPUT_OUT_OF_BOUNDS: "Out of bounds",
    _w.AMDSMI_STATUS_INIT_ERROR: "Initialization error",
    _w.AMDSMI_STATUS_REFCOUNT_OVERFLOW: "Internal reference counter exceeded INT32_MAX",
    _w.AMDSMI_STATUS_DIRECTORY_NOT_FOUND: "Directory not found",
    _w.AMDSMI_STATUS_BUSY: "Device busy",
    _w.AMDSMI_STATUS_NOT_FOUND: "Device Not found",
    _w.AMDSMI_STATUS_NOT_INIT: "Device not initialized",
    _w.AMDSMI_STATUS_NO_SLOT: "No more free slot",
    _w.AMDSMI_STATUS_DRIVER_NOT_LOADED: "Driver not loaded",
    _w.AMDSMI_STATUS_NO_DATA: "No data was found for given input",
    _w.AMDSMI_STATUS_INSUFFICIENT_SIZE: "Insufficient size for operation",
    _w.AMDSMI_STATUS_UNEXPECTED_SIZE: "unexpected size of data was read",
    _w.AMDSMI_STATUS_UNEXPECTED_DATA: "The data read or provided was unexpected",
    _w.AMDSMI_STATUS_NON_AMD_CPU: "System has non-AMD CPU",
    _w.AMDSMI_STATUS_NO_ENERGY_DRV: "Energy driver not found",
    _w.AMDSMI_STATUS_NO_MSR_DRV: "MSR driver not found",
    _w.AMDSMI_STATUS_NO_HSMP_DRV: "HSMP driver not found",
    _w.AMDSMI_STATUS_NO_HSMP_SUP: "HSMP not supported",
    _w.AMDSMI_STATUS_NO_HSMP_MSG_SUP: "HSMP message/feature not supported",
    _w.AMDSMI_STATUS_HSMP_TIMEOUT: "HSMP message timeout",
    _w.AMDSMI_STATUS_NO_DRV: "No Energy and HSMP driver present",
    _w.AMDSMI_STATUS_FILE_NOT_FOUND: "File or directory not found",
    _w.AMDSMI_STATUS_ARG_PTR_NULL: "Parsed argument is invalid",
    _w.AMDSMI_STATUS_MAP_ERROR: "The internal library error did not map to a status code",
    _w.AMDSMI_STATUS_AMDGPU_RESTART_ERR: "AMDGPU restart failed, please check dmesg for errors",
    _w.AMDSMI_STATUS_SETTING_UNAVAILABLE: "Setting is not available",
    _w.AMDSMI_STATUS_CORRUPTED_EEPROM: "EEPROM is corrupted",
    _w.AMDSMI_STATUS_UNKNOWN_ERROR: "An unknown error occurred",
}

# Like the real table, MORE_DATA has no entry and shows as UNKNOWN_ERROR.
_NAMES = {
    value: name for name, value in vars(_w).items() if name.startswith("AMDSMI_STATUS_") and value in _DESCRIPTIONS
}


class AmdSmiException(Exception):
    """Base of every amdsmi exception."""


class AmdSmiLibraryException(AmdSmiException):
    """A non-success amdsmi_status_t; the code is stored as a positive number."""

    def __init__(self, err_code):
        err_code = abs(err_code)
        super().__init__(err_code)
        self.err_code = err_code
        if err_code in _NAMES:
            self.err_info = f"{_NAMES[err_code]} - {_DESCRIPTIONS[err_code]}"
        else:
            self.err_info = "AMDSMI_STATUS_UNKNOWN_ERROR - An unknown error occurred"

    def __str__(self):
        return f"Error code:\n\t{self.err_code} | {self.err_info}"

    def get_error_code(self):
        return self.err_code

    def get_error_info(self, detailed=True):
        return self.err_info if detailed else self.err_info.split(" - ")[0]


class AmdSmiRetryException(AmdSmiLibraryException):
    def __init__(self):
        super().__init__(_w.AMDSMI_STATUS_RETRY)


class AmdSmiTimeoutException(AmdSmiLibraryException):
    def __init__(self):
        super().__init__(_w.AMDSMI_STATUS_TIMEOUT)


class AmdSmiParameterException(AmdSmiException):
    """An argument of the wrong type; raised before the library is called."""

    def __init__(self, receivedValue, expectedType, msg=None):
        super().__init__(msg)
        self.err_code = None
        self.actualType = type(receivedValue)
        self.expectedType = expectedType
        self.err_msg = (
            msg
            if msg is not None
            else (f"Invalid parameter:\nActual type: {self.actualType}\nExpected type: {self.expectedType}")
        )

    def __str__(self):
        return self.err_msg


class AmdSmiKeyException(AmdSmiException):
    def __init__(self, key):
        super().__init__()
        self.key = key
        self.err_msg = f"Key {key} is missing from dictionary"

    def __str__(self):
        return self.err_msg


class AmdSmiBdfFormatException(AmdSmiException):
    def __init__(self, bdf):
        super().__init__()
        self.bdf = bdf

    def __str__(self):
        return (
            f"Wrong BDF format: {self.bdf}. \n"
            "BDF string should be: <domain>:<bus>:<device>.<function>\n"
            " or <bus>:<device>.<function> in hexcode format."
        )
