"""Identity profiles: an identity built once from many pictures, saved without them, used by name.

``build`` makes one from pictures (``sources``: what the installed models need; ``build``: faces,
outliers, encodings), ``store`` keeps it as one ``.safetensors`` file per profile, and
``use`` hands a unit's method what it would have computed from the pictures.
"""

from .build import MAX_PICTURES, BuildResult, Sources, build_profile, pack_name
from .outliers import OUTLIER_COSINE, find_outliers
from .profile import (FaceSet, PhotoMakerEmbeds, Profile, ProfileError, ProfileExistsError,
                      ProfileNotFoundError)
from .sources import build, gather
from .store import (MAX_PROFILE_BYTES, NAME_RULE, PROFILE_SUBFOLDER, check_name, delete_profile, forget_loaded,
                    list_profiles, load_profile, profile_names, profile_path, save_profile)

__all__ = [
    "MAX_PICTURES", "MAX_PROFILE_BYTES", "NAME_RULE", "OUTLIER_COSINE", "PROFILE_SUBFOLDER", "BuildResult",
    "FaceSet", "PhotoMakerEmbeds", "Profile", "ProfileError", "ProfileExistsError", "ProfileNotFoundError",
    "Sources", "build", "build_profile", "check_name", "delete_profile", "find_outliers", "forget_loaded",
    "gather", "list_profiles", "load_profile", "pack_name", "profile_names", "profile_path", "save_profile",
]
