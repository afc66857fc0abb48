/* cloneaware native layer.  See cloneaware.h for the contract. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <linux/btrfs.h>

#include "cloneaware.h"

#ifndef CA_VERSION
#error "CA_VERSION must be defined by the builder"
#endif

#define CA_FIEMAP_BATCH 512

const char *ca_version(void)
{
    return CA_VERSION;
}

void ca_free(void *p)
{
    free(p);
}

int ca_fiemap(int fd, struct ca_extent **out, size_t *count)
{
    size_t bufsize = sizeof(struct fiemap) +
                     CA_FIEMAP_BATCH * sizeof(struct fiemap_extent);
    struct fiemap *fm = malloc(bufsize);
    struct ca_extent *res = NULL;
    size_t n = 0, cap = 0;
    uint64_t start = 0;
    uint32_t reqflags = FIEMAP_FLAG_SYNC;
    int done = 0;

    *out = NULL;
    *count = 0;
    if (!fm)
        return -ENOMEM;
    while (!done) {
        memset(fm, 0, sizeof(struct fiemap));
        fm->fm_start = start;
        fm->fm_length = FIEMAP_MAX_OFFSET - start;
        fm->fm_flags = reqflags;
        fm->fm_extent_count = CA_FIEMAP_BATCH;
        if (ioctl(fd, FS_IOC_FIEMAP, fm) < 0) {
            int err = errno;
            free(fm);
            free(res);
            return -err;
        }
        reqflags = 0; /* one sync is enough */
        if (fm->fm_mapped_extents == 0)
            break;
        if (n + fm->fm_mapped_extents > cap) {
            size_t ncap = cap ? cap * 2 : CA_FIEMAP_BATCH;
            struct ca_extent *nres;
            while (ncap < n + fm->fm_mapped_extents)
                ncap *= 2;
            nres = realloc(res, ncap * sizeof(*res));
            if (!nres) {
                free(fm);
                free(res);
                return -ENOMEM;
            }
            res = nres;
            cap = ncap;
        }
        for (uint32_t i = 0; i < fm->fm_mapped_extents; i++) {
            struct fiemap_extent *fe = &fm->fm_extents[i];
            res[n].logical = fe->fe_logical;
            res[n].physical = fe->fe_physical;
            res[n].length = fe->fe_length;
            res[n].flags = fe->fe_flags;
            res[n].reserved = 0;
            n++;
            if (fe->fe_flags & FIEMAP_EXTENT_LAST)
                done = 1;
        }
        {
            struct fiemap_extent *last =
                &fm->fm_extents[fm->fm_mapped_extents - 1];
            uint64_t next = last->fe_logical + last->fe_length;
            if (next <= start || next >= FIEMAP_MAX_OFFSET)
                done = 1; /* no progress: never loop forever */
            start = next;
        }
    }
    free(fm);
    *out = res;
    *count = n;
    return 0;
}

int ca_ficlonerange(int dst_fd, int src_fd, uint64_t src_offset,
                    uint64_t length, uint64_t dst_offset)
{
    struct file_clone_range r = {
        .src_fd = src_fd,
        .src_offset = src_offset,
        .src_length = length,
        .dest_offset = dst_offset,
    };
    return ioctl(dst_fd, FICLONERANGE, &r) < 0 ? -errno : 0;
}

int ca_ficlone(int dst_fd, int src_fd)
{
    return ioctl(dst_fd, FICLONE, src_fd) < 0 ? -errno : 0;
}

int ca_fideduperange(int src_fd, uint64_t src_offset, uint64_t length,
                     const int *dst_fds, const uint64_t *dst_offsets,
                     uint16_t count, uint64_t *bytes_deduped, int32_t *status)
{
    size_t size = sizeof(struct file_dedupe_range) +
                  (size_t)count * sizeof(struct file_dedupe_range_info);
    struct file_dedupe_range *r = calloc(1, size);
    int ret = 0;

    if (!r)
        return -ENOMEM;
    r->src_offset = src_offset;
    r->src_length = length;
    r->dest_count = count;
    for (uint16_t i = 0; i < count; i++) {
        r->info[i].dest_fd = dst_fds[i];
        r->info[i].dest_offset = dst_offsets[i];
    }
    if (ioctl(src_fd, FIDEDUPERANGE, r) < 0) {
        ret = -errno;
    } else {
        for (uint16_t i = 0; i < count; i++) {
            bytes_deduped[i] = r->info[i].bytes_deduped;
            status[i] = r->info[i].status;
        }
    }
    free(r);
    return ret;
}

int ca_btrfs_fsid(int fd, uint8_t *uuid16)
{
    struct btrfs_ioctl_fs_info_args args;

    memset(&args, 0, sizeof(args));
    if (ioctl(fd, BTRFS_IOC_FS_INFO, &args) < 0)
        return -errno;
    memcpy(uuid16, args.fsid, 16);
    return 16;
}

int ca_renameat2(int olddirfd, const char *oldpath, int newdirfd,
                 const char *newpath, unsigned int flags)
{
    return renameat2(olddirfd, oldpath, newdirfd, newpath, flags) < 0
               ? -errno : 0;
}

int ca_fstatfs(int fd, uint64_t *fs_type, uint64_t *block_size)
{
    struct statfs st;

    if (fstatfs(fd, &st) < 0)
        return -errno;
    *fs_type = (uint64_t)st.f_type;
    *block_size = (uint64_t)st.f_bsize;
    return 0;
}

int ca_syncfs(int fd)
{
    return syncfs(fd) < 0 ? -errno : 0;
}

int ca_sync_file_range(int fd, int64_t offset, int64_t length)
{
    return sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) < 0 ? -errno : 0;
}

int ca_btrfs_snapshot(int src_fd, int dst_dir_fd, const char *name, int readonly)
{
    struct btrfs_ioctl_vol_args_v2 args;

    if (strlen(name) > BTRFS_SUBVOL_NAME_MAX)
        return -ENAMETOOLONG;
    memset(&args, 0, sizeof(args));
    args.fd = src_fd;
    args.flags = readonly ? BTRFS_SUBVOL_RDONLY : 0;
    strcpy(args.name, name);
    return ioctl(dst_dir_fd, BTRFS_IOC_SNAP_CREATE_V2, &args) < 0 ? -errno : 0;
}

int ca_btrfs_snap_destroy(int dir_fd, const char *name)
{
    struct btrfs_ioctl_vol_args args;

    if (strlen(name) > BTRFS_PATH_NAME_MAX)
        return -ENAMETOOLONG;
    memset(&args, 0, sizeof(args));
    strcpy(args.name, name);
    return ioctl(dir_fd, BTRFS_IOC_SNAP_DESTROY, &args) < 0 ? -errno : 0;
}
