# Locating ThunderKittens (header-only, not on any package registry).
#
# genie_tk_find_thunderkittens(<root-var> <commit-var> <error-var>) sets
#   <root-var>   a directory that holds include/kittens.cuh (and prototype/),
#   <commit-var> the pinned commit, or "local" for THUNDERKITTENS_ROOT,
#   <error-var>  "" on success, otherwise why ThunderKittens is unavailable.
# It never fails the configure step itself: the caller decides whether a
# missing ThunderKittens is fatal (GENIE_TK_CUDA=ON) or not (AUTO).

set(GENIE_TK_THUNDERKITTENS_COMMIT "0b55588d2769dde0c7a9a606ffc015b0ca7a9551")
# A cache entry so that a mirror (or a file:// URL) can stand in for GitHub; it
# must serve GitHub's archive layout, ThunderKittens-<commit>/...
set(GENIE_TK_THUNDERKITTENS_URL
    "https://github.com/HazyResearch/ThunderKittens/archive/${GENIE_TK_THUNDERKITTENS_COMMIT}.tar.gz"
    CACHE STRING "Archive of the pinned ThunderKittens commit, used when THUNDERKITTENS_ROOT is empty")
# Short, so that a machine without GitHub access (CI) is not held up for long.
set(GENIE_TK_DOWNLOAD_TIMEOUT 20 CACHE STRING
    "Seconds before the ThunderKittens download is abandoned")

function(genie_tk_find_thunderkittens out_root out_commit out_error)
  set(${out_root} "" PARENT_SCOPE)
  set(${out_commit} "" PARENT_SCOPE)

  if(THUNDERKITTENS_ROOT)
    if(EXISTS "${THUNDERKITTENS_ROOT}/include/kittens.cuh")
      set(${out_root} "${THUNDERKITTENS_ROOT}" PARENT_SCOPE)
      set(${out_commit} "local" PARENT_SCOPE)
      set(${out_error} "" PARENT_SCOPE)
    else()
      set(${out_error}
          "ThunderKittens not found: THUNDERKITTENS_ROOT=${THUNDERKITTENS_ROOT} has no include/kittens.cuh"
          PARENT_SCOPE)
    endif()
    return()
  endif()

  # The build directory persists between builds (build-dir in pyproject.toml),
  # so a successful download is reused.
  set(deps "${CMAKE_BINARY_DIR}/_deps")
  set(root "${deps}/thunderkittens-${GENIE_TK_THUNDERKITTENS_COMMIT}")
  if(NOT EXISTS "${root}/include/kittens.cuh")
    set(archive "${deps}/thunderkittens-${GENIE_TK_THUNDERKITTENS_COMMIT}.tar.gz")
    message(STATUS "genie-tk: THUNDERKITTENS_ROOT is not set; downloading ThunderKittens "
                   "${GENIE_TK_THUNDERKITTENS_COMMIT} (timeout ${GENIE_TK_DOWNLOAD_TIMEOUT} s)")
    file(DOWNLOAD "${GENIE_TK_THUNDERKITTENS_URL}" "${archive}"
         STATUS status
         TIMEOUT ${GENIE_TK_DOWNLOAD_TIMEOUT}
         INACTIVITY_TIMEOUT 10)
    list(GET status 0 code)
    list(GET status 1 reason)
    if(NOT code EQUAL 0)
      file(REMOVE "${archive}")
      set(${out_error}
          "ThunderKittens not found: THUNDERKITTENS_ROOT is not set and downloading ${GENIE_TK_THUNDERKITTENS_URL} failed (${reason}); set THUNDERKITTENS_ROOT to a ThunderKittens tree that contains include/kittens.cuh"
          PARENT_SCOPE)
      return()
    endif()
    # GitHub archives unpack into ThunderKittens-<commit>/.
    set(unpack "${deps}/thunderkittens-unpack")
    file(REMOVE_RECURSE "${unpack}" "${root}")
    file(ARCHIVE_EXTRACT INPUT "${archive}" DESTINATION "${unpack}")
    file(RENAME "${unpack}/ThunderKittens-${GENIE_TK_THUNDERKITTENS_COMMIT}" "${root}" RESULT renamed)
    file(REMOVE_RECURSE "${unpack}")
    file(REMOVE "${archive}")
    if(NOT EXISTS "${root}/include/kittens.cuh")
      set(${out_error}
          "ThunderKittens not found: the downloaded archive has no include/kittens.cuh"
          PARENT_SCOPE)
      return()
    endif()
  endif()
  set(${out_root} "${root}" PARENT_SCOPE)
  set(${out_commit} "${GENIE_TK_THUNDERKITTENS_COMMIT}" PARENT_SCOPE)
  set(${out_error} "" PARENT_SCOPE)
endfunction()
