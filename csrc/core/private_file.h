/*
 * private_file.h - how native code creates a file that holds guest memory or
 * device state (a sim domain, a restore target, --dm-out, their
 * temporaries): the rules of xcsave/files.py, in C.
 *
 *  - O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC: never an existing file,
 *    never through a planted symlink (dangling or not: O_EXCL does not
 *    follow one), never inherited by a child;
 *  - mode 0600 whatever the umask (fchmod on the new fd).
 *
 * Conventions: an fd (or 0) on success, -1 with errno set on failure; these
 * functions never print.
 */
#ifndef XCS_PRIVATE_FILE_H
#define XCS_PRIVATE_FILE_H

#ifdef __cplusplus
extern "C" {
#endif

#define XCS_PRIVATE_MODE 0600

/* A new private file at path, opened with flags (O_RDWR, O_WRONLY, ...). */
int xcs_create_private(const char *path, int flags);

/*
 * A new private file named prefix + 12 random characters (from getrandom):
 * nobody can guess the name to plant something there first, and a name
 * that is taken anyway (EEXIST) is drawn again.  *path_out gets the name
 * (malloc'd, the caller frees it) on success, NULL on failure.
 */
int xcs_create_private_temp(const char *prefix, int flags, char **path_out);

/*
 * rename(from, to) that never replaces an existing to (EEXIST):
 * renameat2(RENAME_NOREPLACE), or link + unlink on a filesystem without it.
 * With replace set, a plain rename.
 */
int xcs_rename_noreplace(const char *from, const char *to, int replace);

#ifdef __cplusplus
}
#endif

#endif /* XCS_PRIVATE_FILE_H */
