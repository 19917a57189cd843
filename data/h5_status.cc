#include "data/h5_status.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/core/status.h"

namespace moe::data {

void H5Id::Reset() {
  if (id_ < 0) return;
  switch (H5Iget_type(id_)) {
    case H5I_FILE:
      H5Fclose(id_);
      break;
    case H5I_DATASET:
      H5Dclose(id_);
      break;
    case H5I_DATASPACE:
      H5Sclose(id_);
      break;
    case H5I_DATATYPE:
      H5Tclose(id_);
      break;
    case H5I_GROUP:
      H5Gclose(id_);
      break;
    case H5I_GENPROP_LST:
      H5Pclose(id_);
      break;
    case H5I_ATTR:
      H5Aclose(id_);
      break;
    default:
      H5Idec_ref(id_);
      break;
  }
  id_ = H5I_INVALID_HID;
}

ScopedH5Quiet::ScopedH5Quiet() {
  H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

ScopedH5Quiet::~ScopedH5Quiet() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }

namespace {

herr_t CollectError(unsigned /*n*/, const H5E_error2_t* err, void* client) {
  auto* lines = static_cast<std::vector<std::string>*>(client);
  lines->push_back(absl::StrCat(err->func_name != nullptr ? err->func_name : "?",
                                "(): ", err->desc != nullptr ? err->desc : ""));
  return 0;
}

}  // namespace

absl::Status H5Error(const std::string& call, const std::string& file, const char* src_file, int src_line) {
  std::vector<std::string> lines;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, CollectError, &lines);
  H5Eclear2(H5E_DEFAULT);
  // The outermost entries say what failed, the innermost why; keep a few of each.
  if (lines.size() > 4) lines.erase(lines.begin() + 2, lines.end() - 2);
  return absl::InternalError(absl::StrCat(call, " failed at ", SourceLocation(src_file, src_line), " on ",
                                          file, lines.empty() ? "" : ": ", absl::StrJoin(lines, "; ")));
}

}  // namespace moe::data
