"""epctl's exit codes, one scheme for every subcommand."""

EXIT_OK = 0
EXIT_FAILED = 1  # anything else (an operation rolled back under --wait, a write error)
EXIT_USAGE = 2  # bad usage or a request the coordinator calls invalid (INVALID_ARGUMENT)
EXIT_UNAVAILABLE = 3  # the coordinator could not be reached (UNAVAILABLE, DEADLINE_EXCEEDED)
EXIT_NOT_FOUND = 4  # no such operation or member (NOT_FOUND)
EXIT_REFUSED = 5  # the cluster's state does not allow it (FAILED_PRECONDITION)
# No or a wrong admin credential (UNAUTHENTICATED), or one that is not an
# admin's (PERMISSION_DENIED): see --token-file, --cert/--key.
EXIT_DENIED = 6
