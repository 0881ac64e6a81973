module github.com/sealcast/sealcast

go 1.26
